"""The processes a benchmark runs beside the broker: a throwaway redis-server, and the console's own long-running
processes (a Celery worker, the MQTT consumer) with their output in a log file kept only with FLEET_BENCH_KEEP."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fleet.ports import free_port

ROOT = Path(__file__).resolve().parent.parent


class Redis:
    """A throwaway redis-server for the Celery queue and the broker lock."""

    def __init__(self):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = tempfile.mkdtemp(prefix="fleetkeeper-bench-redis-")
        self.proc = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
            + ["--save", "", "--appendonly", "no", "--dir", self.dir, "--loglevel", "warning"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


class ConsoleProcess:
    """One of the console's processes against the bench database and ``redis_url``, logging to a temporary file."""

    name = "process"

    def __init__(self, args: list[str], *, redis_url: str):
        self.log_path = Path(tempfile.mkstemp(prefix=f"fleetkeeper-bench-{self.name}-", suffix=".log")[1])
        self._log = self.log_path.open("w")
        env = {**os.environ, "REDIS_URL": redis_url, "CELERY_BROKER_URL": redis_url, "LOG_LEVEL": "WARNING"}
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()
        if not os.environ.get("FLEET_BENCH_KEEP"):
            self.log_path.unlink(missing_ok=True)


class Worker(ConsoleProcess):
    """`celery -A fleet worker --pool=solo`, returned once it says it is ready."""

    name = "worker"

    def __init__(self, redis_url: str):
        super().__init__(
            [sys.executable, "-m", "celery", "-A", "fleet", "worker", "--pool=solo", "--loglevel=INFO"]
            + ["--without-gossip", "--without-mingle", "--hostname", f"bench-{os.getpid()}@%h"],
            redis_url=redis_url,
        )
        deadline = time.monotonic() + 60
        while " ready." not in self.log():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("celery worker did not start:\n" + self.log())
            time.sleep(0.1)


class Consumer(ConsoleProcess):
    """`manage.py consume` (the MQTT consumer as its own process, as a worker replica runs it)."""

    name = "consumer"

    def __init__(self, redis_url: str):
        super().__init__(
            [sys.executable, "manage.py", "consume", "--no-monitor", "--report-every", "30"], redis_url=redis_url
        )
