"""The registry's Ed25519 signing key: generated in the console, stored encrypted with the PKI passphrase (the same
PKCS#8 encryption as the CA keys, security/pki/ca.py), used only to sign image digests. Devices verify with
fleetkeeper_device/firmware.py (``verify_offer``) configured with the public key PEM."""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleetkeeper_device.firmware import load_public_key, sign_digest, verify_offer  # noqa: F401  (re-exported)
from security.pki.ca import decrypt_key, encrypt_key


def passphrase() -> str:
    """FLEET_PKI_KEY: production must set it (fleet/settings.py refuses to start without it); dev generates one."""
    from django.conf import settings

    return settings.FLEET_PKI_KEY


def key_id_for(public_key) -> str:
    """Short, stable: derived from the raw public key, so anyone holding the PEM can recompute it."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "fw-" + hashlib.sha256(raw).hexdigest()[:16]


def generate() -> tuple[str, str, str]:
    """(key id, public key PEM, encrypted private key PEM)."""
    private = Ed25519PrivateKey.generate()
    public = private.public_key()
    public_pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    return key_id_for(public), public_pem, encrypt_key(private, passphrase())


def sign(private_key_encrypted: str, sha256_hex: str) -> str:
    """Base64 Ed25519 signature over the 32 raw bytes of the digest (what the device library verifies)."""
    return sign_digest(decrypt_key(private_key_encrypted, passphrase()), sha256_hex)
