"""Device and console secrets as the console stores them: PBKDF2-HMAC-SHA512 with a 12-byte salt, written
``$7$<iterations>$<b64 salt>$<b64 64-byte hash>``. The form is Mosquitto's password-file form, so the Mosquitto
adapter can hand the stored hash to the broker as it is; every other adapter (the HTTP hook) checks a presented
secret against it here. One iteration by default: the secrets are 256-bit random (docs/broker.md, "Hash cost")."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets

SALT_BYTES = 12
HASH_BYTES = 64
_B64 = r"[A-Za-z0-9+/]+={0,2}"
PASSWORD_HASH_RE = re.compile(rf"^\$7\$(?P<iterations>[1-9][0-9]{{0,8}})\$(?P<salt>{_B64})\$(?P<hash>{_B64})$")


class SecretHashError(ValueError):
    """A stored hash is not of the ``$7$`` form."""


def hash_secret(secret: str, *, iterations: int, salt: bytes | None = None) -> str:
    """The stored form of ``secret``: what the console keeps and what a broker checks."""
    if iterations < 1:
        raise ValueError("iterations must be at least 1")
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    if len(salt) != SALT_BYTES:
        raise ValueError(f"the stored form needs a {SALT_BYTES}-byte salt")
    digest = hashlib.pbkdf2_hmac("sha512", secret.encode(), salt, iterations, HASH_BYTES)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def parse_hash(stored: str) -> tuple[int, bytes, bytes]:
    match = PASSWORD_HASH_RE.match(stored)
    if not match:
        raise SecretHashError("not a $7$ password hash")
    try:
        salt = base64.b64decode(match["salt"], validate=True)
        digest = base64.b64decode(match["hash"], validate=True)
    except ValueError as exc:
        raise SecretHashError("bad base64 in a password hash") from exc
    if len(salt) != SALT_BYTES or len(digest) != HASH_BYTES:
        raise SecretHashError(f"a password hash needs a {SALT_BYTES}-byte salt and a {HASH_BYTES}-byte digest")
    return int(match["iterations"]), salt, digest


def verify_secret(secret: str, stored: str) -> bool:
    """Constant time in the secret: the comparison is hmac.compare_digest over the derived hashes."""
    iterations, salt, digest = parse_hash(stored)
    candidate = hashlib.pbkdf2_hmac("sha512", secret.encode(), salt, iterations, HASH_BYTES)
    return hmac.compare_digest(candidate, digest)
