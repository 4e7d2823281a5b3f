"""Real servers for tests: started on free 127.0.0.1 ports, stopped when the test session ends."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fleet.ports import wait_for_port

BASE_DIR = Path(__file__).resolve().parents[2]


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
