"""Pure function: the CRL the broker loads. Signed by the issuing CA (Mosquitto checks the leaf against the CRL of
its issuer), with a nextUpdate in the future (a CRL past nextUpdate makes OpenSSL refuse every client)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .ca import _aki, signing_hash

REASONS = {
    "key_compromise": x509.ReasonFlags.key_compromise,
    "superseded": x509.ReasonFlags.superseded,
    "cessation_of_operation": x509.ReasonFlags.cessation_of_operation,
    "unspecified": x509.ReasonFlags.unspecified,
}


def crl_build(
    *,
    issuer_key,
    issuer_cert: x509.Certificate,
    revoked: Iterable[tuple[int, dt.datetime, str]],
    this_update: dt.datetime,
    next_update: dt.datetime,
    number: int,
) -> str:
    """``revoked``: (serial, revocation time, reason code name). Deterministic for the same inputs, so rendering it
    on every apply does not change the policy digest unless something was revoked (or the CRL is renewed)."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer_cert.subject)
        .last_update(this_update)
        .next_update(next_update)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(_aki(issuer_cert), critical=False)
    )
    for serial, when, reason in sorted(revoked, key=lambda r: r[0]):
        entry = (
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(when)
            .add_extension(x509.CRLReason(REASONS.get(reason, x509.ReasonFlags.unspecified)), critical=False)
            .build()
        )
        builder = builder.add_revoked_certificate(entry)
    crl = builder.sign(issuer_key, signing_hash(issuer_key))
    return crl.public_bytes(serialization.Encoding.PEM).decode()
