"""Decisions a broker asks of the console, answered from the desired state (``policy.Identity``): may this login
connect, may it publish on this topic, may it subscribe with this filter. Deny by default: every answer is a
``Decision`` whose ``allow`` is True only when each rule passed, and whose ``reason`` says which rule refused.

Pure and broker-neutral; the adapters translate their broker's request (RabbitMQ's form posts, EMQX's JSON) into
these calls and the answer back."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from .policy import Identity, covers, is_valid_filter, is_valid_topic, pattern_matches
from .secrets import SecretHashError, hash_secret, verify_secret

# Checked against when the username is unknown, so that an unknown user costs the same hash as a known one.
_UNKNOWN_USER_HASH = hash_secret("fleetkeeper-unknown-user", iterations=1, salt=b"\0" * 12)
MAX_FIELD_LENGTH = 1024


@dataclass(frozen=True)
class Decision:
    allow: bool
    reason: str  # "ok", or the rule that refused (also the detection event's kind)

    def __bool__(self) -> bool:
        return self.allow


ALLOW = Decision(True, "ok")


def _deny(reason: str) -> Decision:
    return Decision(False, reason)


def connect_decision(identity: Identity | None, *, username: str, password: str, client_id: str) -> Decision:
    """The login, the secret (constant time), the binding of credential to client id, and the device's status."""
    if not username or not password:
        return _deny("anonymous")
    if len(username) > MAX_FIELD_LENGTH or len(password) > MAX_FIELD_LENGTH or len(client_id) > MAX_FIELD_LENGTH:
        return _deny("malformed")
    if identity is None:
        verify_secret(password, _UNKNOWN_USER_HASH)
        return _deny("unknown_username")
    if identity.console_secret:
        secret_ok = hmac.compare_digest(password.encode(), identity.console_secret.encode())
    elif identity.secret_hash:
        try:
            secret_ok = verify_secret(password, identity.secret_hash)
        except SecretHashError:
            secret_ok = False
    else:
        verify_secret(password, _UNKNOWN_USER_HASH)
        secret_ok = False
    if not secret_ok:
        return _deny("bad_secret")
    if not identity.may_connect:
        return _deny(f"not_allowed:{identity.status or identity.kind}")
    if client_id != identity.client_id:
        # One credential, one client id: another id would let a device act as, or take over, another's session.
        return _deny("client_id_mismatch")
    return ALLOW


def session_decision(identity: Identity | None, *, client_id: str) -> Decision:
    """What every question after the login checks first: the identity still exists and may connect, and the
    session's client id (when the broker says it) is the one its credential is bound to."""
    if identity is None:
        return _deny("unknown_username")
    if not identity.may_connect:
        return _deny(f"not_allowed:{identity.status or identity.kind}")
    if client_id and client_id != identity.client_id:
        return _deny("client_id_mismatch")
    return ALLOW


def publish_decision(identity: Identity | None, *, client_id: str, topic: str) -> Decision:
    session = session_decision(identity, client_id=client_id)
    if not session:
        return session
    if not is_valid_topic(topic):
        return _deny("malformed_topic")
    if any(pattern_matches(pattern, topic) for pattern in identity.grants.publish):
        return ALLOW
    return _deny("publish_denied")


def subscribe_decision(identity: Identity | None, *, client_id: str, topic_filter: str) -> Decision:
    session = session_decision(identity, client_id=client_id)
    if not session:
        return session
    if not is_valid_filter(topic_filter):
        return _deny("malformed_topic")
    if any(covers(grant, topic_filter) for grant in identity.grants.subscribe):
        return ALLOW
    return _deny("subscribe_denied")
