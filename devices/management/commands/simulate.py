"""manage.py simulate: run devices of the fleet against the configured broker, some of them hostile.

A thin wrapper: it picks the devices, issues each a fresh credential through the credentials service
(audited, as the "simulator" service), and hands them to fleetkeeper_device.simulator, which does the rest.
"""

from __future__ import annotations

import json
import random

from django.conf import settings
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.management.base import BaseCommand, CommandError

from devices.models import Device
from fleetkeeper_device.simulator import DeviceSpec, Simulation, add_run_arguments, choose_hostile
from fleetkeeper_device.topics import TopicScheme
from security.audit import audit_context
from security.brokers import broker_capabilities


def issue_simulator_credentials(devices: list[Device], *, payload_keys: bool = False) -> list[DeviceSpec]:
    """A fresh secret for each device, through the same service an operator uses; audited as service:simulator.
    With ``payload_keys``, a fresh payload key too (payload_key_issue), so the devices seal what they publish."""
    from security.payloads import payload_key_issue
    from security.services import credential_issue

    specs = []
    with audit_context(service="simulator"):
        for device in devices:
            issued = credential_issue(actor=None, device=device)
            firmware = device.firmware_version or (device.model.latest_firmware if device.model_id else "") or "1.0.0"
            specs.append(
                DeviceSpec(
                    device.client_id,
                    issued.password,
                    firmware=firmware,
                    model=device.model.name if device.model_id else None,
                    payload_key=payload_key_issue(actor=None, device=device).key_text if payload_keys else None,
                )
            )
    return specs


class Command(BaseCommand):
    help = (
        "Run N active devices of the fleet as simulated devices with real MQTT connections to the configured broker "
        "(MQTT_HOST:MQTT_PORT), each with its own telemetry shape and rhythm, reporting its firmware; K of them, "
        "chosen at random, attack (brute force, wildcard subscriptions, publishing on other devices' topics, "
        "oversize packets, client-id takeover, replays, floods). Prints one summary line per second; Ctrl-C stops. "
        "A demo tool: it RE-ISSUES a new secret for every device it runs, which replaces the secret a real device "
        "holds; each re-issue is written to the audit log as service:simulator. The worker loads the new secrets "
        "into the broker; devices retry until it has."
    )

    def add_arguments(self, parser):
        parser.add_argument("--devices", type=int, default=50, metavar="N", help="how many devices (default 50)")
        parser.add_argument("--host", default=None, help="broker host (default settings.MQTT_HOST)")
        parser.add_argument("--port", type=int, default=None, help="broker port (default settings.MQTT_PORT)")
        parser.add_argument(
            "--payload-keys",
            action="store_true",
            help="also issue each device a new payload key (audited) and seal everything it publishes; hostile "
            "devices then replay and tamper with sealed messages (payload_replayed, payload_tampered alerts)",
        )
        add_run_arguments(parser)

    def handle(self, *args, **options):
        count, hostile = options["devices"], options["hostile"]
        if count < 1:
            raise CommandError("--devices must be at least 1.")
        if hostile < 0 or hostile > count:
            raise CommandError(f"--hostile must be between 0 and --devices ({count}).")
        capabilities = broker_capabilities()
        mqtt_version = "5" if capabilities.get("mqtt5") else "3.1.1"
        if hostile and mqtt_version != "5":
            raise CommandError(
                f"The {capabilities['name']} broker speaks MQTT 3.1.1 only, and hostile devices judge the broker's "
                "refusals by MQTT 5 reason codes: simulate with --hostile 0."
            )
        devices = list(
            Device.objects.filter(status=Device.Status.ACTIVE).select_related("model").order_by("client_id")[:count]
        )
        if not devices:
            raise CommandError(
                "The fleet has no active devices: add some (manage.py seed_demo, or import a CSV), then run again."
            )
        if len(devices) < count:
            # `make run` starts this next to the web server: running the devices there are beats stopping them all.
            self.stderr.write(
                f"The fleet has {len(devices)} active devices, {count} were asked for: simulating {len(devices)}. "
                "Add devices (manage.py seed_demo, or import a CSV) to simulate more."
            )
            if hostile > len(devices):
                raise CommandError(f"--hostile {hostile} is more than the {len(devices)} active devices.")
        try:
            specs = issue_simulator_credentials(devices, payload_keys=options["payload_keys"])
        except PermissionDenied as exc:
            raise CommandError(
                f"The credentials service refused to issue secrets for the simulator: {str(exc).rstrip('.')}. "
                "It must accept actor=None inside audit_context(service=...) for service callers."
            ) from exc
        except ValidationError as exc:
            raise CommandError(f"Could not issue a credential: {'; '.join(exc.messages)}") from exc
        rng = random.Random(options["seed"])
        specs = choose_hostile(specs, hostile, rng)
        host = options["host"] or settings.MQTT_HOST
        port = options["port"] or settings.MQTT_PORT
        hostile_ids = [s.client_id for s in specs if s.hostile]
        self.stdout.write(
            f"Issued {len(specs)} credentials{' and payload keys' if options['payload_keys'] else ''} "
            f"(audited as service:simulator). Connecting to {host}:{port}"
            + (f"; hostile: {', '.join(hostile_ids)}" if hostile_ids else "")
            + ". Ctrl-C stops."
        )
        simulation = Simulation(
            specs,
            host=host,
            port=port,
            rate=options["rate"],
            duration=options["duration"] or None,
            connect_rate=options["connect_rate"],
            max_packet_size=settings.MQTT_MAX_PACKET_SIZE,
            mqtt_version=mqtt_version,
            topic_scheme=TopicScheme(tx_prefix=settings.MQTT_TOPIC_TX_PREFIX, rx_prefix=settings.MQTT_TOPIC_RX_PREFIX),
            seed=rng.randrange(2**32),
            out=self.stdout,
            hostile_interval=options["hostile_interval"],
            flood_burst=options["flood_burst"],
        )
        result = simulation.run()
        if options["json"]:
            self.stdout.write(json.dumps(result))
