"""Pure functions: CA and server certificates, key (de)serialisation with encryption at rest, fingerprints."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import secrets
from collections.abc import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def random_serial() -> int:
    """A positive 159-bit serial from the OS CSPRNG (RFC 5280: at most 20 octets, CA/B: at least 64 random bits)."""
    return secrets.randbits(159) | 1 << 64


def new_ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def signing_hash(key) -> hashes.HashAlgorithm | None:
    """Ed25519 signs without a separate hash; everything else here uses SHA-256."""
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 over the DER, as colon-separated upper-case hex (what `openssl x509 -fingerprint -sha256` prints)."""
    digest = cert.fingerprint(hashes.SHA256()).hex().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def load_cert(pem: str | bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode() if isinstance(pem, str) else pem)


def load_certs(pem: str | bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem.encode() if isinstance(pem, str) else pem)


def encrypt_key(key, passphrase: str) -> str:
    """PKCS#8 encrypted with the best algorithm ``cryptography`` offers (PBES2, AES-256-CBC): what we store."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase.encode()),
    ).decode()


def plain_key_pem(key) -> str:
    """Unencrypted PKCS#8: only for the broker's own key file (Mosquitto cannot take a passphrase) and the
    one-time factory bundle."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def decrypt_key(pem: str, passphrase: str):
    return serialization.load_pem_private_key(pem.encode(), password=passphrase.encode())


def _name(common_name: str, organisation: str) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organisation:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation))
    return x509.Name(attrs)


def _ca_key_usage() -> x509.KeyUsage:
    """What a CA key may do: sign certificates and CRLs, nothing else."""
    return x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _ski(public_key) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(public_key)


def _aki(issuer_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def root_ca_create(*, common_name: str, organisation: str = "", days: int = 3650, key=None):
    """A self-signed root: CA, no path length limit beyond one issuing CA under it (pathlen 1)."""
    key = key or new_ec_key()
    name = _name(common_name, organisation)
    start = now() - dt.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(random_serial())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(_ski(key.public_key()), critical=False)
        .sign(key, signing_hash(key))
    )
    return key, cert


def issuing_ca_create(
    *, root_key, root_cert: x509.Certificate, common_name: str, organisation: str = "", days: int = 1825, key=None
):
    """The CA that signs device and broker certificates and the CRL (pathlen 0: it cannot make more CAs)."""
    key = key or new_ec_key()
    start = now() - dt.timedelta(minutes=5)
    not_after = min(start + dt.timedelta(days=days), root_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name, organisation))
        .issuer_name(root_cert.subject)
        .public_key(key.public_key())
        .serial_number(random_serial())
        .not_valid_before(start)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(_ski(key.public_key()), critical=False)
        .add_extension(_aki(root_cert), critical=False)
        .sign(root_key, signing_hash(root_key))
    )
    return key, cert


def leaf_sign(
    *,
    issuer_key,
    issuer_cert: x509.Certificate,
    subject: x509.Name,
    public_key,
    not_before: dt.datetime,
    not_after: dt.datetime,
    server_names: Iterable[str] = (),
    client: bool = True,
    serial: int | None = None,
) -> x509.Certificate:
    """A leaf certificate: not a CA, digitalSignature (+ keyEncipherment for RSA key exchange), one EKU."""
    is_rsa = isinstance(public_key, rsa.RSAPublicKey)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject)
        .public_key(public_key)
        .serial_number(serial or random_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=is_rsa,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]),
            critical=False,
        )
        .add_extension(_ski(public_key), critical=False)
        .add_extension(_aki(issuer_cert), critical=False)
    )
    names = []
    for host in server_names:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, signing_hash(issuer_key))


def server_cert_create(*, issuer_key, issuer_cert: x509.Certificate, hosts: Iterable[str], days: int = 365, key=None):
    """The broker's certificate: serverAuth, the host names and addresses devices dial as subjectAltName."""
    hosts = list(dict.fromkeys(h for h in hosts if h))
    key = key or new_ec_key()
    start = now() - dt.timedelta(minutes=5)
    cert = leaf_sign(
        issuer_key=issuer_key,
        issuer_cert=issuer_cert,
        subject=_name(hosts[0] if hosts else "fleetkeeper-broker", ""),
        public_key=key.public_key(),
        not_before=start,
        not_after=min(start + dt.timedelta(days=days), issuer_cert.not_valid_after_utc),
        server_names=hosts,
        client=False,
    )
    return key, cert


def common_name(name: x509.Name) -> str:
    values = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(values[0].value) if values else ""


def keys_match(key, cert: x509.Certificate) -> bool:
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    return key.public_key().public_bytes(enc, pub) == cert.public_key().public_bytes(enc, pub)


def is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, Exception):  # InvalidSignature and friends
        return False
    return True


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
