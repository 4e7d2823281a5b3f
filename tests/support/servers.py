"""Real servers for tests: started on free 127.0.0.1 ports, stopped when the test session ends."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parents[2]


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port() -> int:
    """A free 127.0.0.1 port for a server a test starts, chosen *below* the kernel's ephemeral range.

    A port from the ephemeral range (what binding port 0 gives) is free only for the moment: the session keeps its
    broker ports for its whole length and restarts the broker on them test after test, and in between, any outgoing
    connection on the machine (another xdist worker's client, say) can be handed that very port as its source port;
    the broker then fails to start with "address in use". Ports under the range are never handed out that way."""
    low, _ = _ephemeral_range()
    floor = min(20_000, max(1024, low - 10_000))
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(floor, low)
        with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port found between {floor} and {low} on 127.0.0.1")


def wait_for_port(port: int, timeout: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class RedisServer:
    def __init__(self, port: int):
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.dir = tempfile.mkdtemp(prefix="fleetkeeper-redis-")
        self.proc: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: run `make test`, which installs it")
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        wait_for_port(self.port, proc=self.proc)
        return self

    def stop(self, *, keep_dir: bool = False) -> None:
        """keep_dir: an outage in the middle of a test; start() brings the same server back on the same port."""
        if self.proc:
            stop(self.proc)
        if not keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


class CeleryWorker:
    """`celery -A fleet worker` in its own process, against the test database and the test Redis."""

    def __init__(self, *, db_name: str, extra_env: dict[str, str] | None = None, queues: str | None = None):
        self.db_name = db_name
        self.extra_env = extra_env or {}
        self.queues = queues
        self.log_path = Path(tempfile.mkstemp(prefix="fleetkeeper-worker-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> CeleryWorker:
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "fleet.settings_test",
            "FLEET_TEST_DB_NAME": self.db_name,
            **self.extra_env,
        }
        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "fleet",
            "worker",
            "--pool=solo",
            "--loglevel=INFO",
            "--without-gossip",
            "--without-mingle",
            "--hostname",
            f"test-{os.getpid()}@%h",
        ]
        if self.queues:
            cmd += ["-Q", self.queues]
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(cmd, cwd=BASE_DIR, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"celery worker exited early:\n{self.log()}")
            if " ready." in self.log():
                return self
            time.sleep(0.1)
        raise TimeoutError(f"celery worker not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc:
            stop(self.proc)
        self._log.close()
