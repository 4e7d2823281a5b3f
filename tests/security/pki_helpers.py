"""Shared by the PKI tests: device keys and CSRs, certificates signed outside the console, TLS clients."""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from django.conf import settings

from security.pki import ca as pki_ca
from security.pki.csr import csr_build


def ec_key():
    return ec.generate_private_key(ec.SECP256R1())


def rsa_key(bits: int):
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def ed_key():
    return ed25519.Ed25519PrivateKey.generate()


def key_pem(key) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def csr_for(client_id: str, key=None) -> tuple[object, str]:
    key = key or ec_key()
    return key, csr_build(key, client_id)


def csr_with_subject(key, subject: x509.Name) -> str:
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, pki_ca.signing_hash(key))
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def cn(value: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, value)])


def tampered_csr(client_id: str) -> str:
    """A CSR whose signature no longer matches its content (one byte of the signature flipped)."""
    key = ec_key()
    csr = x509.CertificateSigningRequestBuilder().subject_name(cn(client_id)).sign(key, pki_ca.signing_hash(key))
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01
    tampered = x509.load_der_x509_csr(bytes(der))
    assert not tampered.is_signature_valid
    return tampered.public_bytes(serialization.Encoding.PEM).decode()


def sign_with_console_ca(client_id: str, *, not_before: dt.datetime, not_after: dt.datetime):
    """A certificate from the console's own issuing CA with any validity (the console's API refuses past ones)."""
    from security.pki.csr import device_cert_sign
    from security.pki.services import _issuing_key, pki_ensure

    issuing = pki_ensure()
    key = ec_key()
    leaf = device_cert_sign(
        issuer_key=_issuing_key(issuing),
        issuer_cert=pki_ca.load_cert(issuing.certificate_pem),
        client_id=client_id,
        public_key=key.public_key(),
        not_before=not_before,
        not_after=not_after,
    )
    return key_pem(key), pki_ca.cert_pem(leaf.certificate)


def foreign_ca_certificate(client_id: str):
    """A certificate for ``client_id`` from a CA the broker does not trust (same names as the console's CAs)."""
    from security.pki.csr import device_cert_sign

    organisation = settings.PKI_ORGANISATION
    root_key, root_cert = pki_ca.root_ca_create(common_name=f"{organisation} fleet root CA", organisation=organisation)
    issuing_key, issuing_cert = pki_ca.issuing_ca_create(
        root_key=root_key,
        root_cert=root_cert,
        common_name=f"{organisation} device issuing CA",
        organisation=organisation,
    )
    key = ec_key()
    leaf = device_cert_sign(
        issuer_key=issuing_key, issuer_cert=issuing_cert, client_id=client_id, public_key=key.public_key(), days=30
    )
    return key_pem(key), pki_ca.cert_pem(leaf.certificate) + pki_ca.cert_pem(issuing_cert)
