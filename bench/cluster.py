"""The cluster adapter (issue 15): connects per second through the console's HTTP auth hook, against the same
two-node RabbitMQ cluster with its own internal user store, in one run (design.md: the hook at least half).

The hook is served as production serves it: gunicorn (threaded workers, keep-alive) running fleet.hook_wsgi, the
bench database behind its decision cache (a throwaway Redis). The first round meets a cold cache.
Connects are raw MQTT 3.1.1 CONNECTs from one thread (bench/mqtt_raw.py), a bounded number in flight, all to node A.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
import urllib.request

from fleet.ports import free_port, wait_for_port

from .broker import devices_create, record
from .mqtt_raw import close_all, connect_many
from .processes import ROOT, Redis

MANAGEMENT_USER = "fleetkeeper-bench"


def _name(n: int) -> str:
    return f"device-hk{n:06d}"


def _secret(n: int) -> str:
    return f"hook-bench-secret-{n:06d}-0123456789abcdefghijklmnop"


def _internal_hash(password: str) -> str:
    """RabbitMQ's rabbit_password_hashing_sha256: base64(salt + sha256(salt + password)), a 4-byte salt."""
    salt = secrets.token_bytes(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def _import_internal_users(node, count: int, password_for) -> None:
    """Users ``internal-<n>`` in the cluster's own store, with access to the vhost, in one definitions import."""
    definitions = {
        "users": [
            {
                "name": f"internal-{n:06d}",
                "password_hash": _internal_hash(password_for(n)),
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": [],
            }
            for n in range(count)
        ],
        "permissions": [
            {"user": f"internal-{n:06d}", "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"}
            for n in range(count)
        ],
    }
    token = base64.b64encode(f"{MANAGEMENT_USER}:{node.management_password}".encode()).decode()
    request = urllib.request.Request(  # noqa: S310 (http on loopback)
        f"{node.management_url}/api/definitions",
        data=json.dumps(definitions).encode(),
        method="POST",
        headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:  # noqa: S310
        assert response.status in (200, 201, 204), response.status


class HookServer:
    """gunicorn serving the hook's own WSGI application (fleet.hook_wsgi) on a free port, as production runs it,
    against the bench's database, with the decision cache in ``cache_url``."""

    def __init__(self, *, cache_url: str, workers: int = 2, threads: int = 8):
        self.port = free_port()
        self.log_path = os.path.join(os.environ["FLEET_VAR_DIR"], "gunicorn.log")
        self._log = open(self.log_path, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "--bind",
                f"127.0.0.1:{self.port}",
                "--worker-class",
                "gthread",
                "--workers",
                str(workers),
                "--threads",
                str(threads),
                "--keep-alive",
                "30",
                "fleet.hook_wsgi:application",
            ],
            cwd=ROOT,
            env={**os.environ, "DEBUG": "false", "BROKER_BACKEND": "rabbitmq", "ENFORCEMENT_CACHE_URL": cache_url},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_for_port(self.port, timeout=30, proc=self.proc)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


def _rate(port: int, credentials: list[tuple[str, str]], concurrency: int) -> tuple[float, int]:
    result = connect_many(port, credentials, concurrency=concurrency, timeout=300)
    close_all(result.sockets)
    if result.ok != len(credentials):
        raise RuntimeError(
            f"{result.ok} of {len(credentials)} connects accepted ({result.refused} refused, {result.errors} errors)"
        )
    return len(credentials) / result.elapsed, result.ok


def run(*, devices: int, rounds: int = 3, concurrency: int = 20) -> None:
    from django.conf import settings

    from security.brokers.rabbitmq_local import RabbitCluster

    print(
        f"\nCluster adapter: connects through the HTTP hook vs the internal user store ({devices} each)",
        flush=True,
    )
    devices_create(0, devices, iterations=settings.MQTT_PASSWORD_ITERATIONS, name=_name, secret=_secret)
    redis_server = Redis()
    hook = HookServer(cache_url=redis_server.url)
    cluster = RabbitCluster(
        2,
        hook_url=f"http://127.0.0.1:{hook.port}/rabbitmq/{settings.BROKER_HOOK_SECRET}",
        management_user=MANAGEMENT_USER,
        management_password=secrets.token_urlsafe(16),
    )
    try:
        cluster.start()
        node = cluster.nodes[0]
        _import_internal_users(node, devices, _secret)
        through_hook = [(_name(n), _secret(n)) for n in range(devices)]
        internal = [(f"internal-{n:06d}", _secret(n)) for n in range(devices)]
        hook_rates, internal_rates = [], []
        for _ in range(rounds):  # alternated, so that neither store gets the warmer machine
            hook_rates.append(_rate(node.mqtt_port, through_hook, concurrency)[0])
            internal_rates.append(_rate(node.mqtt_port, internal, concurrency)[0])
        hook_rate, internal_rate = statistics.median(hook_rates), statistics.median(internal_rates)
        print(
            f"  connects/s, {rounds} rounds: hook {[round(r) for r in hook_rates]}, "
            f"internal {[round(r) for r in internal_rates]}",
            flush=True,
        )
        record(
            "cluster: connects/s through the hook / with the internal user store",
            hook_rate / internal_rate,
            "x",
            at_least=0.5,
            note=f"hook {hook_rate:.0f} connects/s, internal store {internal_rate:.0f} connects/s (medians), "
            f"{concurrency} in flight, two nodes, all to node A",
        )
    finally:
        cluster.stop()
        hook.stop()
        redis_server.stop()
        time.sleep(0.1)
