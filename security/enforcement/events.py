"""What a broker asked and the core refused, as events for detection: every refused login, publish and subscribe the
HTTP auth hook answers goes to one Redis stream (capped at BROKER_HOOK_EVENTS_MAXLEN), with the username, client
id, source address and topic the broker said; the hook adapters' ``events()`` read it back, and detection raises
its alerts from them (authentication failures, brute force, ACL violations, client-id misuse).

It also keeps the failed-login count per username that the hook's brute-force limit reads (shared by every hook
process through Redis; when Redis is down, each process counts for itself).

Recording never fails the answer: a Redis that is down loses the event (counted in ``stats["lost"]``), never the
deny.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass

import redis
from django.conf import settings

from .decisions import Decision
from .store import redis_client

stats: Counter[str] = Counter()  # per process: denials by reason, and "lost" events
LOGIN_FAILURES = {"bad_secret", "unknown_username", "anonymous", "too_many_failures"}
_local_failures: dict[tuple[str, int], int] = {}
_local_lock = threading.Lock()


@dataclass(frozen=True)
class BrokerEvent:
    """One refusal, as detection reads it: ``kind`` is the core's reason (``bad_secret``, ``publish_denied``,
    ``client_id_mismatch``, ...), ``check`` what the broker asked (``user``, ``topic``, ``authn``, ...)."""

    id: str
    at: float
    broker: str
    check: str
    kind: str
    username: str = ""
    client_id: str = ""
    ip: str = ""
    topic: str = ""
    permission: str = ""


def _stream() -> str:
    return f"{settings.ENFORCEMENT_CACHE_PREFIX}:events"


def _clip(value, limit: int) -> str:
    return str(value or "")[:limit]


def record(decision: Decision, *, broker: str, check: str, fields: dict) -> None:
    """A refusal the hook answered. ``fields``: what the dialect read of the request (username, client_id, ip,
    topic, permission)."""
    stats[decision.reason] += 1
    event = {
        "at": f"{time.time():.3f}",
        "broker": broker,
        "check": _clip(check, 32),
        "kind": _clip(decision.reason, 64),
        "username": _clip(fields.get("username"), 128),
        "client_id": _clip(fields.get("client_id"), 128),
        "ip": _clip(fields.get("ip"), 64),
        "topic": _clip(fields.get("topic"), 256),
        "permission": _clip(fields.get("permission"), 16),
    }
    client = redis_client()
    try:
        with client.pipeline(transaction=False) as pipe:
            pipe.xadd(_stream(), event, maxlen=settings.BROKER_HOOK_EVENTS_MAXLEN, approximate=True)
            if decision.reason in LOGIN_FAILURES and event["username"]:
                key, _window = _failure_key(event["username"])
                pipe.incr(key)
                pipe.expire(key, settings.BROKER_HOOK_LOGIN_WINDOW * 2)
            pipe.execute()
    except redis.RedisError:
        stats["lost"] += 1
        if decision.reason in LOGIN_FAILURES and event["username"]:
            with _local_lock:
                if len(_local_failures) > 10_000:
                    _local_failures.clear()
                slot = (event["username"], int(time.time() // settings.BROKER_HOOK_LOGIN_WINDOW))
                _local_failures[slot] = _local_failures.get(slot, 0) + 1


def _failure_key(username: str) -> tuple[str, int]:
    window = int(time.time() // settings.BROKER_HOOK_LOGIN_WINDOW)
    return f"{settings.ENFORCEMENT_CACHE_PREFIX}:fail:{window}:{username}", window


def too_many_failures(username: str) -> bool:
    """More than BROKER_HOOK_LOGIN_FAILURES failed logins for ``username`` in the current window."""
    limit = settings.BROKER_HOOK_LOGIN_FAILURES
    key, window = _failure_key(username)
    try:
        count = int(redis_client().get(key) or 0)
    except redis.RedisError:
        with _local_lock:
            count = _local_failures.get((username, window), 0)
    return count >= limit


def read(after: str = "0", *, count: int = 1000, block_ms: int | None = None) -> list[BrokerEvent]:
    """Events after the stream id ``after`` ("0": from the oldest kept; "$": only new ones), oldest first."""
    answer = redis_client().xread({_stream(): after}, count=count, block=block_ms)
    found = []
    for _stream_name, entries in answer or []:
        for event_id, fields in entries:
            text = {k.decode(): v.decode() for k, v in fields.items()}
            found.append(
                BrokerEvent(
                    id=event_id.decode(),
                    at=float(text.pop("at", 0) or 0),
                    **{k: text.get(k, "") for k in ("broker", "check", "kind", "username", "client_id", "ip")},
                    topic=text.get("topic", ""),
                    permission=text.get("permission", ""),
                )
            )
    return found


def latest_id() -> str:
    """The id of the newest event kept ("0-0" when none): where a reader that wants only new events starts."""
    newest = redis_client().xrevrange(_stream(), count=1)
    return newest[0][0].decode() if newest else "0-0"
