"""The decision cache: each device identity's desired state, kept in Redis for the HTTP auth hook, invalidated by
the outbox (never by a timer). A Redis that is down or slow means the database answers: never an allow that the
database would not give.

How a stale entry is made impossible. Every entry carries the two counters it was read under: the fleet's
generation (``<prefix>:gen``) and the identity's own version (``<prefix>:v:<username>``). A change of desired
state, once committed, increments the identity's version (``invalidate``) or the generation (``invalidate_all``);
an entry whose counters are not the current ones is a miss. The counters are read *before* the database, so a
reader that raced a change stores its (maybe old) answer under counters that the change's increment has already
moved on: nobody ever uses it.

Who invalidates: the outbox, twice. ``security.services.enforcement_enqueue`` right after the change's commit (so a
new question is answered afresh at once), and the outbox's apply before it ends the live sessions; a failed
invalidation leaves the change pending, and it is retried with the kick (design.md's "delays, never forgets").

Redis for this cache must not persist to disk (``--save "" --appendonly no``, as ``make run`` and the tests start
it; docker-compose's Redis keeps an append-only file for Celery, so point ENFORCEMENT_CACHE_URL elsewhere there):
a snapshot restored after a restart could bring back counters that an invalidation had already moved on. Entries
expire after ENFORCEMENT_CACHE_MAX_AGE seconds only to bound the memory; no answer depends on that expiry.
"""

from __future__ import annotations

import json
import logging
from collections import Counter

import redis
from django.conf import settings

from devices.validators import is_valid_client_id

from .policy import Grants, Identity
from .state import identity_desired
from .store import redis_client

log = logging.getLogger(__name__)

# Per process: hits, misses, fallbacks (Redis unavailable: the database answered), invalidation failures.
stats: Counter[str] = Counter()


class CacheUnavailable(Exception):
    """The decision cache's Redis did not answer an invalidation: the change must stay pending."""


def _keys(username: str) -> tuple[str, str, str]:
    prefix = settings.ENFORCEMENT_CACHE_PREFIX
    return f"{prefix}:gen", f"{prefix}:v:{username}", f"{prefix}:id:{username}"


def _encode(identity: Identity | None) -> dict | None:
    if identity is None:
        return None
    fields = dict(identity.__dict__)
    fields["grants"] = {"publish": list(identity.grants.publish), "subscribe": list(identity.grants.subscribe)}
    return fields


def _decode(fields: dict | None) -> Identity | None:
    if fields is None:
        return None
    grants = fields.pop("grants")
    return Identity(**fields, grants=Grants(tuple(grants["publish"]), tuple(grants["subscribe"])))


def _counter(raw: bytes | None) -> int:
    return int(raw) if raw is not None else 0


def identity(username: str) -> Identity | None:
    """``state.identity_desired(username)``, from the cache when its entry is current. Console identities come from
    the settings and names outside the prefix rule are never looked up: neither touches Redis."""
    if not is_valid_client_id(username):
        return identity_desired(username)
    gen_key, version_key, entry_key = _keys(username)
    client = redis_client()
    try:
        gen, version, raw = client.mget(gen_key, version_key, entry_key)
    except redis.RedisError:
        stats["fallback"] += 1
        return identity_desired(username)
    gen, version = _counter(gen), _counter(version)
    if raw is not None:
        try:
            entry = json.loads(raw)
            if entry["g"] == gen and entry["v"] == version:
                stats["hit"] += 1
                return _decode(entry["i"])
        except (ValueError, KeyError, TypeError):
            pass  # an entry this code did not write: read the database and overwrite it
    stats["miss"] += 1
    desired = identity_desired(username)
    try:
        client.set(
            entry_key,
            json.dumps({"g": gen, "v": version, "i": _encode(desired)}, separators=(",", ":")),
            ex=settings.ENFORCEMENT_CACHE_MAX_AGE,
        )
    except redis.RedisError:
        stats["fallback"] += 1
    return desired


def invalidate(usernames: list[str]) -> None:
    """Every cached answer about these identities is stale from now on. Raises CacheUnavailable."""
    names = sorted({name for name in usernames if name})
    if not names:
        return
    try:
        with redis_client().pipeline(transaction=False) as pipe:
            for name in names:
                pipe.incr(_keys(name)[1])
            pipe.execute()
    except redis.RedisError as exc:
        stats["invalidation_failed"] += 1
        raise CacheUnavailable(f"the decision cache's Redis did not answer: {exc}") from exc


def invalidate_all() -> None:
    """Every cached answer is stale from now on (a change not about one identity). Raises CacheUnavailable."""
    try:
        redis_client().incr(_keys("")[0])
    except redis.RedisError as exc:
        stats["invalidation_failed"] += 1
        raise CacheUnavailable(f"the decision cache's Redis did not answer: {exc}") from exc


def invalidate_changes(client_ids: list[str]) -> None:
    """What the outbox calls with its rows' client ids: a row without one (a fleet-wide change) stales everything."""
    if any(not client_id for client_id in client_ids):
        invalidate_all()
    invalidate(client_ids)
