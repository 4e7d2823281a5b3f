"""Run a local RabbitMQ cluster wired to the console's hook, in the foreground (the Procfile of `make run-cluster`).

One node per entry of RABBITMQ_MANAGEMENT_URLS (the default stack has two), each in its own directory under
var/rabbitmq/, sharing one Erlang cookie and port mapper (../shared/rabbitmq-notes.md: two nodes on one host). Node n
listens for MQTT on MQTT_PORT + n (node 0 on MQTT_PORT, where the console's own clients connect) and for its
management API on the port its URL names. Every login, publish and subscribe is asked of the hook at
http://BROKER_HOOK_HOST:BROKER_HOOK_PORT/rabbitmq/<BROKER_HOOK_SECRET> (`manage.py run_hook`); only the console's
management user (RABBITMQ_MANAGEMENT_USER, no vhost permission: it cannot use MQTT) lives in the nodes' own store.

The cluster is new at every start: the console is the source of truth and reconciles it once it is up (through
Celery when its Redis answers). Sessions and retained messages do not survive a restart of this command.
Ctrl-C (or SIGTERM) stops every node."""

import signal
import threading
from pathlib import Path
from urllib.parse import urlparse

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from security.brokers.rabbitmq_local import RabbitCluster, rabbitmq_sbin
from security.tasks import reconcile_broker_soon

LOCAL_HOSTS = {"127.0.0.1", "localhost"}


def cluster_plan() -> list[dict]:
    """Per node: its MQTT port, its management port and its directory, from the settings. Raises CommandError when
    the settings name a node this machine cannot run."""
    urls = settings.RABBITMQ_MANAGEMENT_URLS
    if not urls:
        raise CommandError("RABBITMQ_MANAGEMENT_URLS is empty: name one management URL per node to run.")
    if settings.MQTT_HOST not in LOCAL_HOSTS:
        raise CommandError(f"MQTT_HOST is {settings.MQTT_HOST!r}: a local cluster listens on 127.0.0.1 only.")
    plan = []
    for n, url in enumerate(urls):
        parsed = urlparse(url)
        if parsed.hostname not in LOCAL_HOSTS or not parsed.port:
            raise CommandError(
                f"RABBITMQ_MANAGEMENT_URLS entry {url!r} is not a local address with a port "
                "(e.g. http://127.0.0.1:15672): this command runs the nodes on this machine."
            )
        plan.append(
            {
                "mqtt_port": settings.MQTT_PORT + n,
                "management_port": parsed.port,
                "directory": Path(settings.VAR_DIR) / "rabbitmq" / f"node-{n}",
            }
        )
    return plan


class Command(BaseCommand):
    help = (
        "Start a local RabbitMQ cluster (one node per RABBITMQ_MANAGEMENT_URLS entry) whose logins, publishes and "
        "subscribes are asked of the console's hook (manage.py run_hook); BROKER_BACKEND must be rabbitmq. Runs in "
        "the foreground; Ctrl-C stops every node."
    )

    def add_arguments(self, parser):
        parser.add_argument("--no-reconcile", action="store_true", help="Do not trigger a reconcile after start.")

    def handle(self, *args, **options):
        if settings.BROKER_BACKEND != "rabbitmq":
            raise CommandError(
                f"BROKER_BACKEND is {settings.BROKER_BACKEND!r}: the console would not enforce through this cluster "
                "(the hook answers only the configured broker). Set BROKER_BACKEND=rabbitmq (make run-cluster does)."
            )
        try:
            rabbitmq_sbin()
        except RuntimeError as exc:
            raise CommandError(str(exc)) from exc
        plan = cluster_plan()
        hook_url = (
            f"http://{settings.BROKER_HOOK_HOST}:{settings.BROKER_HOOK_PORT}/rabbitmq/{settings.BROKER_HOOK_SECRET}"
        )
        cluster = RabbitCluster(
            len(plan),
            node_options=plan,
            hook_url=hook_url,
            management_user=settings.RABBITMQ_MANAGEMENT_USER,
            management_password=settings.RABBITMQ_MANAGEMENT_PASSWORD,
        )
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        self.stdout.write(f"Starting {len(plan)} RabbitMQ node(s); the first takes about 15 s, each join as long.")
        try:
            cluster.start()
            for n, node in enumerate(cluster.nodes):
                self.stdout.write(
                    f"node {n} ({node.name}): MQTT 127.0.0.1:{node.mqtt_port}, management {node.management_url}, "
                    f"log in {node.dir / 'log'}"
                )
            self.stdout.write(
                f"The cluster asks the hook at http://{settings.BROKER_HOOK_HOST}:{settings.BROKER_HOOK_PORT}/."
            )
            if not options["no_reconcile"]:
                try:
                    reconcile_broker_soon(trigger="broker-start")
                except Exception as exc:  # noqa: BLE001 - the cluster runs on; the next scheduled reconcile retries
                    self.stderr.write(f"run_cluster: reconcile after start failed: {exc}")
            self.stdout.flush()
            while not stop.wait(1.0):
                dead = [node.name for node in cluster.nodes if node.proc is None or node.proc.poll() is not None]
                if dead:
                    raise CommandError(f"RabbitMQ node(s) {', '.join(dead)} stopped; see their logs above.")
        finally:
            self.stdout.write("Stopping the RabbitMQ nodes.")
            cluster.terminate()
