"""Firmware offers: verify before accepting.

The console (its firmware registry) signs the SHA-256 digest of each image with an Ed25519 key; a
device is configured with the public key and accepts an offer only if the signature verifies. It
then downloads the image and must check the image's digest against the signed one before flashing
(``FirmwareOffer.check_image``). The signature covers the digest only, not the version label, so the
library also refuses offers older than the running firmware unless told otherwise.

Needs the ``cryptography`` package, imported only when a key is configured.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Callable
from dataclasses import dataclass


class FirmwareRejected(Exception):
    """The offer is refused; the message becomes the ack's ``detail``."""


@dataclass(frozen=True)
class FirmwareOffer:
    message_id: str
    version: str
    url: str
    size: int
    sha256: str
    signature: str
    key_id: str | None = None

    @classmethod
    def from_message(cls, message: dict) -> FirmwareOffer:
        return cls(
            message_id=message["id"],
            version=message["version"],
            url=message["url"],
            size=message["size"],
            sha256=message["sha256"],
            signature=message["signature"],
            key_id=message.get("key_id"),
        )

    def check_image(self, image: bytes) -> None:
        """Raise FirmwareRejected unless ``image`` is the very image whose digest was signed."""
        if len(image) != self.size:
            raise FirmwareRejected(f"image is {len(image)} bytes, the offer said {self.size}")
        if not hmac.compare_digest(hashlib.sha256(image).hexdigest(), self.sha256):
            raise FirmwareRejected("image digest does not match the signed digest")


# The device application's decision once the signature verified: True to accept (and start the
# download/install in the background), False or FirmwareRejected to decline.
FirmwareHook = Callable[[FirmwareOffer], bool]


def load_public_key(key: bytes | str):
    """An Ed25519 public key from PEM, or from 32 raw bytes (or their hex/base64 text)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if isinstance(key, str):
        text = key.strip()
        if text.startswith("-----BEGIN"):
            key = text.encode()
        elif re.fullmatch(r"[0-9a-fA-F]{64}", text):
            key = bytes.fromhex(text)
        else:
            key = base64.b64decode(text, validate=True)
    if key.startswith(b"-----BEGIN"):
        loaded = serialization.load_pem_public_key(key)
        if not isinstance(loaded, Ed25519PublicKey):
            raise ValueError("the firmware signing key must be an Ed25519 public key")
        return loaded
    if len(key) != 32:
        raise ValueError(f"a raw Ed25519 public key is 32 bytes, got {len(key)}")
    return Ed25519PublicKey.from_public_bytes(key)


def verify_offer(offer: FirmwareOffer, public_key) -> None:
    """Raise FirmwareRejected unless ``offer.signature`` is a valid Ed25519 signature of its digest."""
    from cryptography.exceptions import InvalidSignature

    if public_key is None:
        raise FirmwareRejected("no firmware signing key is configured on this device; refusing unsigned updates")
    try:
        signature = base64.b64decode(offer.signature, validate=True)
        public_key.verify(signature, bytes.fromhex(offer.sha256))
    except (InvalidSignature, ValueError):
        raise FirmwareRejected("firmware signature does not verify with this device's signing key") from None


def sign_digest(private_key, sha256_hex: str) -> str:
    """The signer's half (the console's firmware registry, and tests): base64 Ed25519 over the digest."""
    return base64.b64encode(private_key.sign(bytes.fromhex(sha256_hex))).decode()


def version_key(version: str) -> tuple[int, ...] | None:
    """Dotted numeric versions compare numerically ("1.10.0" > "1.9.3"); anything else is not compared."""
    match = re.fullmatch(r"v?(\d+(?:\.\d+)*)", version.strip())
    return tuple(int(part) for part in match.group(1).split(".")) if match else None


def is_downgrade(offered: str, running: str) -> bool:
    new, old = version_key(offered), version_key(running)
    return new is not None and old is not None and new < old
