"""Render the broker files and run Mosquitto in the foreground (the Procfile of `make run` uses this).

The command writes its own pid into the pid file and then *execs* Mosquitto, so the pid file names the broker
(Mosquitto itself writes one only when daemonised). Before the exec, a detached helper process waits until the
broker listens and triggers a reconcile (through Celery if it is reachable, otherwise inline), so changes made while
the broker was down are applied and verified by the canary probe.

With ``--supervise`` (what `make run` uses) the command stays the parent instead: it runs Mosquitto as its child,
writes the child's pid into the pid file, and when the broker dies (Mosquitto 2.0.11 can crash, docs/broker.md,
"Known broker bug") renders the files again and restarts it after a short, growing pause, with a reconcile after each
start. SIGTERM and SIGINT are passed on to the broker and end the loop."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from security.brokers import get_adapter
from security.services import policy_desired
from security.tasks import reconcile_broker_soon


def _wait_for_listener(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def _reconcile_when_listening(host: str, port: int) -> None:
    from django.db import connections

    connections.close_all()  # never share the parent's database connection across fork
    if not _wait_for_listener(host, port, timeout=60):
        return
    try:
        reconcile_broker_soon(trigger="broker-start")
    except Exception as exc:  # noqa: BLE001 - a helper must never take the broker down
        sys.stderr.write(f"run_broker: reconcile after start failed: {exc}\n")


class Command(BaseCommand):
    help = "Render the broker files into MQTT_BROKER_DIR and exec Mosquitto in the foreground."

    def add_arguments(self, parser):
        parser.add_argument("--no-reconcile", action="store_true", help="Do not trigger a reconcile after start.")
        parser.add_argument(
            "--supervise",
            action="store_true",
            help="Run Mosquitto as a child and restart it when it dies (re-rendering its files first); "
            "SIGTERM/SIGINT stop both.",
        )
        parser.add_argument(
            "--log-file",
            help="Append Mosquitto's own log (every connection and subscription) to this file instead of stdout; "
            "make run uses it so the broker does not drown the other processes' output.",
        )

    def handle(self, *args, **options):
        binary = shutil.which(settings.MQTT_BROKER_BINARY) or shutil.which("mosquitto", path="/usr/sbin:/usr/bin")
        if binary is None:
            raise CommandError("mosquitto is not installed (Debian: apt-get install mosquitto).")
        adapter = get_adapter()
        policy = policy_desired()
        adapter.write(policy)
        cfg = adapter.cfg
        self.stdout.write(
            f"Broker files in {cfg.broker_dir}: {len(policy.device_usernames)} device(s); "
            f"listening on {cfg.host}:{cfg.port}; running as {cfg.run_as or 'the current user'}."
        )
        if not options["supervise"]:
            _write_pid(cfg.pid_file, os.getpid())  # the pid that exec keeps
            if not options["no_reconcile"]:
                _reconcile_in_background(cfg)
        sys.stdout.flush()
        sys.stderr.flush()
        argv = [binary, "-c", cfg.config_file]
        stdbuf = shutil.which("stdbuf")
        if stdbuf:  # line-buffered logs under a process manager (honcho); stdbuf execs Mosquitto, same pid
            argv = [stdbuf, "-oL", *argv]
        if options["log_file"]:
            self.stdout.write(f"Mosquitto's log: {options['log_file']}")
            sys.stdout.flush()
            log_fd = os.open(options["log_file"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
            os.dup2(log_fd, 1)
            os.dup2(log_fd, 2)
            os.close(log_fd)
        if options["supervise"]:
            self._supervise(argv, adapter, reconcile=not options["no_reconcile"])
            return
        os.execv(argv[0], argv)  # noqa: S606 - exec with an argument list, no shell

    def _supervise(self, argv: list[str], adapter, *, reconcile: bool) -> None:
        cfg = adapter.cfg
        state = {"stopping": False, "child": None}

        def forward(signum, _frame):
            state["stopping"] = True
            child = state["child"]
            if child is not None and child.poll() is None:
                child.send_signal(signum)

        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
        restarts = 0
        while True:
            child = state["child"] = subprocess.Popen(argv)  # noqa: S603 - an argument list, no shell
            _write_pid(cfg.pid_file, child.pid)
            if reconcile:
                _reconcile_in_background(cfg)
            started = time.monotonic()
            status = child.wait()
            if state["stopping"]:
                return
            if time.monotonic() - started > 60:
                restarts = 0  # it ran for a while: the next failure starts the backoff again
            restarts += 1
            pause = min(30.0, 0.5 * 2 ** (restarts - 1))
            sys.stderr.write(
                f"run_broker: Mosquitto (pid {child.pid}) exited with status {status}; restarting in {pause:g} s "
                f"(restart {restarts}). Devices reconnect on their own; a reconcile follows the start.\n"
            )
            sys.stderr.flush()
            time.sleep(pause)
            if state["stopping"]:
                return
            try:
                adapter.write(policy_desired())  # what the database asks for now, not what the dead broker had
            except Exception as exc:  # noqa: BLE001 - the broker must come back even if the render fails
                sys.stderr.write(
                    f"run_broker: rendering before the restart failed ({exc}); starting with the files on disk\n"
                )
            from django.db import connections

            connections.close_all()  # the reconcile helper forks: never share a connection across fork


def _write_pid(path: str, pid: int) -> None:
    with open(path, "w") as handle:  # noqa: PTH123
        handle.write(f"{pid}\n")


def _reconcile_in_background(cfg) -> None:
    """A detached helper (double fork, so nobody has to reap it) that reconciles once the broker listens."""
    from django.db import connections

    connections.close_all()
    child = os.fork()
    if child == 0:
        if os.fork() == 0:
            try:
                _reconcile_when_listening(cfg.host, cfg.port)
            finally:
                os._exit(0)
        os._exit(0)
    os.waitpid(child, 0)
