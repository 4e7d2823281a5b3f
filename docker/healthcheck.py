"""Healthchecks of the docker-compose services that run the Fleetkeeper image.

    python docker/healthcheck.py web      the login page answers 200 through gunicorn and Django
    python docker/healthcheck.py broker   Mosquitto accepts TCP connections on MQTT_HOST:MQTT_PORT

Exit 0 when healthy, 1 with a reason otherwise. Standard library only: it must not import Django.
"""

import http.client
import os
import socket
import sys


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


if __name__ == "__main__":
    checks = {"web": web, "broker": broker}
    if len(sys.argv) != 2 or sys.argv[1] not in checks:
        sys.exit(f"usage: healthcheck.py {{{'|'.join(checks)}}}")
    try:
        problem = checks[sys.argv[1]]()
    except OSError as exc:
        problem = str(exc)
    if problem:
        sys.exit(f"unhealthy: {problem}")
