"""Pure functions: check a device's CSR and issue its certificate (or a key + certificate for the factory)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from .ca import common_name, leaf_sign, new_ec_key, now, random_serial

MAX_CSR_BYTES = 16 * 1024
MIN_RSA_BITS = 2048


class CsrError(ValueError):
    """The CSR cannot be signed; the message says why and what to do."""


@dataclass(frozen=True)
class IssuedLeaf:
    certificate: x509.Certificate
    serial: int
    not_before: dt.datetime
    not_after: dt.datetime


def csr_load(pem: str) -> x509.CertificateSigningRequest:
    if not pem or not pem.strip():
        raise CsrError("No CSR given: send a PEM certificate signing request (-----BEGIN CERTIFICATE REQUEST-----).")
    if len(pem) > MAX_CSR_BYTES:
        raise CsrError(f"The CSR is larger than {MAX_CSR_BYTES} bytes.")
    try:
        return x509.load_pem_x509_csr(pem.strip().encode())
    except ValueError as exc:
        raise CsrError(
            "This is not a PEM certificate signing request (expected -----BEGIN CERTIFICATE REQUEST-----)."
        ) from exc


def key_description(public_key) -> str:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return f"EC {public_key.curve.name}"
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"RSA {public_key.key_size}"
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    return type(public_key).__name__


def csr_check(csr: x509.CertificateSigningRequest, *, client_id: str) -> None:
    """Signature (proof the requester holds the key), key type and size, and a subject that names the device."""
    if not csr.is_signature_valid:
        raise CsrError("The CSR's signature does not verify: it was altered or not signed with its own key.")
    try:
        public_key = csr.public_key()
    except Exception as exc:  # unsupported algorithm
        raise CsrError("The CSR's public key type is not supported; use EC P-256, Ed25519 or RSA (2048+).") from exc
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if not isinstance(public_key.curve, ec.SECP256R1):
            raise CsrError(f"EC keys must be on P-256 (secp256r1), not {public_key.curve.name}.")
    elif isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_BITS:
            raise CsrError(f"The RSA key has {public_key.key_size} bits; use at least {MIN_RSA_BITS} (or EC P-256).")
    elif not isinstance(public_key, ed25519.Ed25519PublicKey):
        raise CsrError(f"{key_description(public_key)} keys are not accepted; use EC P-256, Ed25519 or RSA (2048+).")
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1:
        raise CsrError(f"The CSR's subject must have exactly one common name (CN), the client id {client_id!r}.")
    if cns[0].value != client_id:
        raise CsrError(f"The CSR's subject CN is {cns[0].value!r}; it must be this device's client id {client_id!r}.")


def device_cert_sign(
    *,
    issuer_key,
    issuer_cert: x509.Certificate,
    client_id: str,
    public_key,
    days: int | None = None,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> IssuedLeaf:
    """CN = client id (never the CSR's other subject fields), clientAuth only, a random serial."""
    start = not_before or now() - dt.timedelta(minutes=5)
    end = not_after or start + dt.timedelta(days=days or 90)
    end = min(end, issuer_cert.not_valid_after_utc)
    serial = random_serial()
    cert = leaf_sign(
        issuer_key=issuer_key,
        issuer_cert=issuer_cert,
        subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, client_id)]),
        public_key=public_key,
        not_before=start,
        not_after=end,
        client=True,
        serial=serial,
    )
    return IssuedLeaf(certificate=cert, serial=serial, not_before=start, not_after=end)


def csr_sign(*, issuer_key, issuer_cert, client_id: str, csr_pem: str, days: int) -> IssuedLeaf:
    csr = csr_load(csr_pem)
    csr_check(csr, client_id=client_id)
    return device_cert_sign(
        issuer_key=issuer_key, issuer_cert=issuer_cert, client_id=client_id, public_key=csr.public_key(), days=days
    )


def factory_key_new():
    return new_ec_key()


def csr_build(key, client_id: str) -> str:
    """Device side (tests, simulator, docs): a CSR for ``client_id`` signed with ``key``."""
    from cryptography.hazmat.primitives import serialization

    from .ca import signing_hash

    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, client_id)]))
        .sign(key, signing_hash(key))
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


__all__ = [
    "CsrError",
    "IssuedLeaf",
    "common_name",
    "csr_build",
    "csr_check",
    "csr_load",
    "csr_sign",
    "device_cert_sign",
    "factory_key_new",
    "random_serial",
]
