"""Local RabbitMQ nodes and clusters for the tests and the benchmarks (Debian's rabbitmq-server 3.10 with
rabbitmq_mqtt, rabbitmq_auth_backend_http and rabbitmq_management), on free 127.0.0.1 ports, each node in a
directory of its own, a cluster's nodes sharing one Erlang cookie and port mapper; the HTTP auth backend points at
the console's hook. Stopped (nodes and port mapper) by ``stop()``. No Django import.

Runs the node's own scripts (not Debian's wrapper, which switches to the `rabbitmq` user), as whoever runs the
tests; HOME is the node's directory, so the Erlang cookie is the node's own too."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from fleet.ports import free_port, wait_for_port

from .rabbitmq_config import enabled_plugins, render_conf


def rabbitmq_sbin() -> Path:
    found = sorted(glob.glob("/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin"))
    if not found:
        raise RuntimeError("rabbitmq-server is not installed: `scripts/install-system-deps.sh --test` installs it")
    return Path(found[-1])


class RabbitNode:
    def __init__(
        self,
        *,
        hook_url: str,
        management_user: str,
        management_password: str,
        epmd_port: int | None = None,
        cookie: str | None = None,
        mqtt_port: int | None = None,
        management_port: int | None = None,
        directory: Path | None = None,
        definitions: str | None = None,
    ):
        """``hook_url``: the console's hook up to the check name, e.g. http://127.0.0.1:8010/rabbitmq/<s>.
        Nodes of one cluster share ``epmd_port`` and ``cookie`` (``RabbitCluster`` sees to it). The MQTT and
        management ports are free ones unless given (``manage.py run_cluster`` gives the ones the settings name);
        ``directory`` (made empty) instead of a temporary one. ``definitions`` (rabbitmq_config.definitions()):
        imported at boot, as docker-compose's nodes do, instead of adding the management user with rabbitmqctl."""
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir(parents=True)
            self.dir = directory
        else:
            self.dir = Path(tempfile.mkdtemp(prefix="fleetkeeper-rabbitmq-"))
        self.name = f"fk-{uuid.uuid4().hex[:8]}@localhost"
        self.hook_url = hook_url.rstrip("/")
        self.management_user, self.management_password = management_user, management_password
        self.definitions = definitions
        self.amqp_port, self.dist_port = free_port(), free_port()
        self.mqtt_port = mqtt_port or free_port()
        self.management_port = management_port or free_port()
        self.epmd_port = epmd_port or free_port()
        self.cookie = cookie or uuid.uuid4().hex
        self.proc: subprocess.Popen | None = None
        self.sbin = rabbitmq_sbin()

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.management_port}"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "HOME": str(self.dir / "home"),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_PID_FILE": str(self.dir / "node.pid"),
        }

    def _write_config(self) -> None:
        for sub in ("home", "mnesia", "log"):
            (self.dir / sub).mkdir(exist_ok=True)
        cookie = self.dir / "home" / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(self.cookie)
            cookie.chmod(0o400)
        (self.dir / "rabbitmq.conf").write_text(
            render_conf(
                hook_url=self.hook_url,
                amqp_listener=f"127.0.0.1:{self.amqp_port}",
                mqtt_listener=f"127.0.0.1:{self.mqtt_port}",
                management_ip="127.0.0.1",
                management_port=self.management_port,
                definitions_file=str(self.dir / "definitions.json") if self.definitions else None,
            )
        )
        if self.definitions:
            (self.dir / "definitions.json").write_text(self.definitions)
        (self.dir / "enabled_plugins").write_text(enabled_plugins())

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        result = subprocess.run(
            [str(self.sbin / "rabbitmqctl"), "-q", "-n", self.name, *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {result.stderr or result.stdout}")
        return result.stdout

    def start(self, timeout: float = 90.0) -> RabbitNode:
        self._write_config()
        # A restarted node (stop(keep_dir=True)) finds its old pid file: `rabbitmqctl wait` would wait on that pid.
        (self.dir / "node.pid").unlink(missing_ok=True)
        self._out = (self.dir / "server.out").open("a")
        # A process group of its own: the rabbitmq-server script runs the Erlang VM as its child, and a signal
        # meant for the node must reach both (``terminate``).
        self.proc = subprocess.Popen(
            [str(self.sbin / "rabbitmq-server")],
            env=self.env(),
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.ctl("wait", "--timeout", str(int(timeout)), str(self.dir / "node.pid"), timeout=timeout + 10)
        self.ctl("await_startup", timeout=timeout)
        users = self.ctl("list_users")
        if "guest" in users:
            self.ctl("delete_user", "guest")  # a fresh node's administrator with a known password
        if self.management_user not in users:
            self.ctl("add_user", self.management_user, self.management_password)
            self.ctl("set_user_tags", self.management_user, "administrator")
        wait_for_port(self.mqtt_port, timeout=30, proc=self.proc)
        wait_for_port(self.management_port, timeout=30, proc=self.proc)
        return self

    def join(self, other: RabbitNode) -> None:
        """Make this (running, empty) node a member of ``other``'s cluster."""
        self.ctl("stop_app")
        self.ctl("join_cluster", other.name)
        self.ctl("start_app")
        self.ctl("await_startup")

    def log(self) -> str:
        logs = sorted((self.dir / "log").glob("*.log"))
        return "".join(path.read_text(errors="replace") for path in logs)

    def stop(self, *, keep_dir: bool = False, keep_epmd: bool = False) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.ctl("stop", timeout=60)
            except (RuntimeError, subprocess.TimeoutExpired):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        epmd = shutil.which("epmd") or next(iter(glob.glob("/usr/lib/erlang/erts-*/bin/epmd")), None)
        if epmd and not keep_dir and not keep_epmd:
            # The port mapper refuses to stop while it still lists a node, and it notices a killed node's closed
            # socket a moment later: ask again for a little while.
            for _ in range(20):
                answer = subprocess.run(
                    [epmd, "-port", str(self.epmd_port), "-kill"], capture_output=True, text=True, timeout=10
                )
                if "not allowed" not in answer.stdout + answer.stderr:
                    break
                time.sleep(0.1)
        if not keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


class RabbitCluster:
    """Nodes on one host, each with its own ports and directory, one Erlang cookie and port mapper, joined into one
    cluster (../shared/rabbitmq-notes.md: how two nodes run on one host)."""

    def __init__(self, size: int, *, node_options: list[dict] | None = None, **node_kwargs):
        """``node_options``: per node, keyword arguments of its own (ports, directory)."""
        epmd_port, cookie = free_port(), uuid.uuid4().hex
        per_node = node_options or [{} for _ in range(size)]
        self.nodes = [RabbitNode(epmd_port=epmd_port, cookie=cookie, **node_kwargs, **per_node[i]) for i in range(size)]

    def start(self) -> RabbitCluster:
        first, *others = self.nodes
        first.start()
        for node in others:
            node.start()
            node.join(first)
        return self

    def terminate(self, timeout: float = 1.0) -> None:
        """Stop every node at once (SIGTERM: RabbitMQ's own orderly shutdown), kill what still runs after
        ``timeout`` seconds, then the port mapper and the directories. For a process manager that waits only a few
        seconds before it kills (honcho: 5 s); ``stop()`` is the slower, one-node-at-a-time way."""
        started = [node for node in self.nodes if node.proc is not None]
        for node in started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for node in started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.proc.pid, signal.SIGKILL)  # whatever of the group outlived the orderly stop
            node.proc.wait()
            node.proc = None
        self.nodes[0].stop()  # nothing runs any more: the port mapper and the directory
        for node in self.nodes[1:]:
            node.stop(keep_epmd=True)

    def stop(self) -> None:
        # The port mapper is shared: the last node to stop takes it down.
        for node in reversed(self.nodes[1:]):
            node.stop(keep_epmd=True)
        self.nodes[0].stop()
