"""A broker's login question, answered the same way for every hook dialect: the username's failed-login count,
then its identity from the decision cache, then the connect rules (``decisions.connect_decision``).

The lockout (more than BROKER_HOOK_LOGIN_FAILURES failures in BROKER_HOOK_LOGIN_WINDOW seconds) guards device
secrets and unknown usernames. It does not lock out the console's own identities: their secrets are random and
long (no guessing them), and a lockout would let anyone who reaches the broker cut the console off with ten
wrong passwords, or stop the canary probe, whose deliberate wrong login on every apply would count. Their failed
logins are still events for detection."""

from __future__ import annotations

from . import cache, decisions, events


def login_decision(username: str, *, password: str, client_id: str) -> decisions.Decision:
    identity = cache.identity(username)
    if (identity is None or identity.is_device) and events.too_many_failures(username):
        return decisions.Decision(False, "too_many_failures")
    return decisions.connect_decision(identity, username=username, password=password, client_id=client_id)
