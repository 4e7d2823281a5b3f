"""Write the configuration of a RabbitMQ node that enforces through the console's hook (docker-compose's `rabbitmq`
profile runs this in a one-shot container, and every node of the cluster reads what it wrote)."""

import os
import secrets
from pathlib import Path
from urllib.parse import urlsplit

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from security.brokers.rabbitmq_config import definitions, enabled_plugins, render_conf


class Command(BaseCommand):
    help = (
        "Write rabbitmq.conf, enabled_plugins and definitions.json for nodes that ask the console's hook at every "
        "login, publish and subscribe; the definitions hold the console's management user (RABBITMQ_MANAGEMENT_USER"
        "/PASSWORD: administrator tag, no vhost permission) and keep the nodes from creating `guest`."
    )

    def add_arguments(self, parser):
        parser.add_argument("--out", required=True, help="directory to write rabbitmq.conf and enabled_plugins into")
        parser.add_argument(
            "--hook-host",
            default=settings.BROKER_HOOK_HOST,
            help="the name the nodes reach the hook by (default BROKER_HOOK_HOST; `hook` in docker-compose)",
        )
        parser.add_argument("--hook-port", type=int, default=settings.BROKER_HOOK_PORT, help="default BROKER_HOOK_PORT")
        parser.add_argument(
            "--cluster-node",
            action="append",
            default=[],
            metavar="NAME",
            help="a node of the cluster the nodes form at first boot, e.g. rabbit@rabbitmq-1 (repeat for each)",
        )
        parser.add_argument("--mqtt-port", type=int, default=1883, help="each node's MQTT listener (default 1883)")
        parser.add_argument(
            "--owner",
            metavar="UID:GID",
            help="give the files to the nodes' user (999:999 in the rabbitmq image; needs root); they stay 0600",
        )

    def handle(self, *args, **options):
        if settings.BROKER_BACKEND != "rabbitmq":
            raise CommandError(
                f"BROKER_BACKEND is {settings.BROKER_BACKEND!r}: the console would not enforce through these nodes "
                "(and the hook answers only the configured broker). Set BROKER_BACKEND=rabbitmq."
            )
        nodes = options["cluster_node"]
        if nodes:
            self._check_the_console_reaches_these_nodes({node.partition("@")[2] for node in nodes})
        if not settings.BROKER_HOOK_SECRET:
            raise CommandError("BROKER_HOOK_SECRET is not set: the hook would refuse every question of the nodes.")
        if not settings.RABBITMQ_MANAGEMENT_PASSWORD:
            raise CommandError("RABBITMQ_MANAGEMENT_PASSWORD is not set: the console could not kick anyone.")
        out = Path(options["out"])
        out.mkdir(parents=True, exist_ok=True)
        conf = render_conf(
            hook_url=f"http://{options['hook_host']}:{options['hook_port']}/rabbitmq/{settings.BROKER_HOOK_SECRET}",
            amqp_listener="5672",
            mqtt_listener=str(options["mqtt_port"]),
            management_port=15672,
            vhost=settings.RABBITMQ_VHOST,
            max_message_size=settings.MQTT_MAX_PACKET_SIZE,
            log_to_console=True,
            cluster_nodes=options["cluster_node"],
            definitions_file=str(out / "definitions.json"),
        )
        users = definitions(
            management_user=settings.RABBITMQ_MANAGEMENT_USER,
            management_password=settings.RABBITMQ_MANAGEMENT_PASSWORD,
            vhost=settings.RABBITMQ_VHOST,
        )
        owner = None
        if options["owner"]:
            try:
                owner = tuple(int(part) for part in options["owner"].split(":"))
                if len(owner) != 2:
                    raise ValueError
            except ValueError:
                raise CommandError(f"--owner {options['owner']!r}: give UID:GID, e.g. 999:999") from None
        path = out / "rabbitmq.conf"
        # They hold the hook's secret and the management password's hash: readable by the nodes' user only.
        files = [(path, conf), (out / "enabled_plugins", enabled_plugins()), (out / "definitions.json", users)]
        cookie = out / "erlang.cookie"
        if not cookie.exists():
            # The nodes' shared Erlang cookie (it lets a node join the cluster and the CLI tools in): made once, so a
            # node whose config is rendered again still joins the others.
            files.append((cookie, secrets.token_urlsafe(32)))
        for target, text in files:
            # Created 0600 (never readable by others, not even for a moment); an existing file is made 0600 too.
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                os.fchmod(handle.fileno(), 0o600)
                if owner:
                    os.fchown(handle.fileno(), *owner)
                handle.write(text)
        self.stdout.write(
            f"wrote {', '.join(target.name for target, _ in files)} into {out} ({len(nodes)} cluster nodes)"
        )

    @staticmethod
    def _check_the_console_reaches_these_nodes(hosts: set[str]) -> None:
        """The console kicks through RABBITMQ_MANAGEMENT_URLS and reads the fleet on MQTT_HOST: a node outside the
        cluster there (a docker/.env still set for another stack) would leave revocations without a kick."""
        names = ", ".join(sorted(hosts))
        for url in settings.RABBITMQ_MANAGEMENT_URLS:
            if urlsplit(url).hostname not in hosts:
                raise CommandError(
                    f"RABBITMQ_MANAGEMENT_URLS names {url}, which is not a node of this cluster ({names})."
                )
        if settings.MQTT_HOST not in hosts:
            raise CommandError(f"MQTT_HOST is {settings.MQTT_HOST!r}, not a node of this cluster ({names}).")
