"""The Redis the enforcement core keeps its decision cache and the hook's events in (ENFORCEMENT_CACHE_URL): one
client per process, with short timeouts, so that a Redis that is down costs a question ENFORCEMENT_CACHE_TIMEOUT at
most before the database answers it."""

from __future__ import annotations

import redis
from django.conf import settings

_client: tuple[str, redis.Redis] | None = None


def redis_client() -> redis.Redis:
    """The client (a connection pool), made again when the URL changes (tests do)."""
    global _client
    url = settings.ENFORCEMENT_CACHE_URL
    if _client is None or _client[0] != url:
        timeout = settings.ENFORCEMENT_CACHE_TIMEOUT
        _client = (url, redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout))
    return _client[1]
