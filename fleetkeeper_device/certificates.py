"""Certificate renewal on the device: the private key is made here and never leaves.

Needs the ``cryptography`` package.
"""

from __future__ import annotations

from dataclasses import dataclass


class CertificateRejected(Exception):
    """A certificate the device will not install; the message becomes the ack's ``detail``."""


@dataclass(frozen=True)
class KeyAndRequest:
    private_key_pem: str
    csr_pem: str


def make_key_and_csr(client_id: str, key_type: str = "ec-p256") -> KeyAndRequest:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519
    from cryptography.x509.oid import NameOID

    if key_type == "ec-p256":
        key = ec.generate_private_key(ec.SECP256R1())
        algorithm = hashes.SHA256()
    elif key_type == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
        algorithm = None
    else:
        raise CertificateRejected(f"unsupported key type {key_type!r}")
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, client_id)]))
        .sign(key, algorithm)
    )
    return KeyAndRequest(
        private_key_pem=key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode(),
        csr_pem=csr.public_bytes(serialization.Encoding.PEM).decode(),
    )


def check_certificate(certificate_pem: str, *, private_key_pem: str, client_id: str) -> str:
    """Refuse a certificate that is not for this device's pending key and id. Returns its serial (hex)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import NameOID

    try:
        certificate = x509.load_pem_x509_certificate(certificate_pem.encode())
    except ValueError:
        raise CertificateRejected("certificate is not valid PEM") from None
    key = serialization.load_pem_private_key(private_key_pem.encode(), password=None)
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if certificate.public_key().public_bytes(serialization.Encoding.DER, public) != key.public_key().public_bytes(
        serialization.Encoding.DER, public
    ):
        raise CertificateRejected("certificate is for a different key than the one this device made")
    names = [a.value for a in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if names != [client_id]:
        raise CertificateRejected(f"certificate subject CN is {names!r}, expected {client_id!r}")
    return format(certificate.serial_number, "x")
