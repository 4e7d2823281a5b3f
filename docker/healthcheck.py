"""Healthchecks of the docker-compose services that run the Fleetkeeper image.

    python docker/healthcheck.py web      the login page answers 200 through gunicorn and Django
    python docker/healthcheck.py broker   Mosquitto accepts TCP connections on MQTT_HOST:MQTT_PORT
    python docker/healthcheck.py consumer the MQTT consumer reported its counters to Redis in the last minute
    python docker/healthcheck.py hook     the broker hook accepts TCP connections on 127.0.0.1:8010

Exit 0 when healthy, 1 with a reason otherwise. Standard library only: it must not import Django.
"""

import http.client
import os
import socket
import sys
import time
from urllib.parse import urlparse


def web() -> str | None:
    # Ask as the proxy would: a host Django accepts, over "HTTPS" (the proxy terminates TLS), so the answer
    # is the page itself rather than a redirect or a DisallowedHost error in the logs every few seconds.
    hosts = [h.strip().lstrip(".") for h in os.environ.get("ALLOWED_HOSTS", "").split(",") if h.strip()]
    host = next((h for h in hosts if h != "*"), "localhost")
    conn = http.client.HTTPConnection("127.0.0.1", 8000, timeout=5)
    conn.request("GET", "/accounts/login/", headers={"Host": host, "X-Forwarded-Proto": "https"})
    status = conn.getresponse().status
    return None if status == 200 else f"GET /accounts/login/ as {host} answered {status}"


def broker() -> str | None:
    address = (os.environ.get("MQTT_HOST", "127.0.0.1"), int(os.environ.get("MQTT_PORT", "18830")))
    with socket.create_connection(address, timeout=3):
        return None


def hook() -> str | None:
    # A TCP connect only: every HTTP question without the brokers' secret is answered deny, and counted as one.
    with socket.create_connection(("127.0.0.1", 8010), timeout=3):
        return None


def _redis_command(sock, *args: str) -> bytes:
    sock.sendall(b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a.encode()), a.encode()) for a in args))
    reader = sock.makefile("rb")
    line = reader.readline()
    if line.startswith(b"-"):
        raise OSError(line[1:].strip().decode(errors="replace"))
    if line.startswith(b"$"):
        size = int(line[1:])
        return b"" if size < 0 else reader.read(size + 2)[:-2]
    return line[1:].strip()


def consumer() -> str | None:
    """The consumer writes its counters (and the time) to a Redis hash every few seconds (security/detection)."""
    url = urlparse(os.environ.get("REDIS_URL", "redis://redis:6379/0"))
    replica = int(os.environ.get("DETECTION_CONSUMER_REPLICA", "1"))
    base = os.environ.get("MQTT_CONSUMER_USERNAME", "fleetkeeper-consumer")
    username = base if replica == 1 else f"{base}-{replica}"
    key = f"{os.environ.get('DETECTION_REDIS_PREFIX', 'fk:det')}:consumer:{username}"
    with socket.create_connection((url.hostname or "redis", url.port or 6379), timeout=3) as sock:
        if url.password:
            _redis_command(sock, "AUTH", url.password)
        _redis_command(sock, "SELECT", (url.path or "/0").lstrip("/") or "0")
        updated = _redis_command(sock, "HGET", key, "updated")
    if not updated:
        return f"no report from {username} in Redis ({key})"
    age = time.time() - float(updated)
    return None if age < 60 else f"{username} last reported {age:.0f} s ago"


if __name__ == "__main__":
    checks = {"web": web, "broker": broker, "consumer": consumer, "hook": hook}
    if len(sys.argv) != 2 or sys.argv[1] not in checks:
        sys.exit(f"usage: healthcheck.py {{{'|'.join(checks)}}}")
    try:
        problem = checks[sys.argv[1]]()
    except OSError as exc:
        problem = str(exc)
    if problem:
        sys.exit(f"unhealthy: {problem}")
