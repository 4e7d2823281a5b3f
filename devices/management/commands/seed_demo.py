"""A small demo fleet for `make run`, created through the inventory services so it is audited like
any operator's work. Idempotent: what already exists is left alone, so a second run adds nothing."""

import random
from datetime import timedelta

from django.conf import settings
from django.core.management.base import BaseCommand
from django.db import transaction
from django.utils import timezone

from devices.models import Device, DeviceGroup, DeviceModel
from devices.services import catalog_save, device_create
from security.audit import audit_context

DEMO_MODELS = [
    # name, manufacturer, latest firmware, minimum (oldest without known vulnerabilities)
    ("Thermo-200", "Acme Sensors", "2.4.1", "2.1.0"),
    ("GateLink-5", "Northwind Controls", "5.0.3", "4.8.0"),
    ("MeterOne", "Contoso Metering", "1.9.0", "1.7.2"),
]
FIRMWARE = {
    "Thermo-200": ["2.4.1", "2.4.1", "2.3.0", "2.0.7"],
    "GateLink-5": ["5.0.3", "4.9.1", "4.7.0"],
    "MeterOne": ["1.9.0", "1.8.4", "1.6.0"],
}
DEMO_GROUPS = [
    ("plant-berlin", "Production plant, Berlin"),
    ("plant-lyon", "Production plant, Lyon"),
    ("warehouse-north", "Northern distribution warehouse"),
    ("pilot", "Devices in the firmware pilot ring"),
]
DEVICE_PREFIX = "demo-"


class Command(BaseCommand):
    help = (
        "Seed a small demo fleet: 3 device models (with latest and minimum firmware), 4 groups and about "
        "50 devices with varied firmware, groups, MAC addresses, serial numbers and last-seen times "
        "(some recent, some old, some never). Uses the inventory services, so every record is in the "
        "audit log as the 'seed_demo' service. Safe to run again: existing records are not duplicated "
        "or changed."
    )

    def add_arguments(self, parser):
        parser.add_argument("--devices", type=int, default=50, help="How many demo devices to have (default: 50).")

    def handle(self, *args, devices: int, **options):
        # The client id must follow the configured fleet rule; the default prefix is 'device-'.
        fleet_prefix = settings.FLEET_CLIENT_ID_PREFIX
        rng = random.Random(20260101)  # fixed seed: the same fleet every time
        now = timezone.now()
        created = {"models": 0, "groups": 0, "devices": 0}
        with audit_context(service="seed_demo"), transaction.atomic():
            models = {}
            for name, manufacturer, latest, minimum in DEMO_MODELS:
                model = DeviceModel.objects.filter(name=name).first()
                if model is None:
                    model = catalog_save(
                        actor=None,
                        instance=DeviceModel(
                            name=name,
                            manufacturer=manufacturer,
                            latest_firmware=latest,
                            minimum_firmware=minimum,
                            description="Demo data from `manage.py seed_demo`.",
                        ),
                    )
                    created["models"] += 1
                models[name] = model
            groups = []
            for name, description in DEMO_GROUPS:
                group = DeviceGroup.objects.filter(name=name).first()
                if group is None:
                    group = catalog_save(actor=None, instance=DeviceGroup(name=name, description=description))
                    created["groups"] += 1
                groups.append(group)

            existing = set(
                Device.objects.filter(client_id__startswith=fleet_prefix + DEVICE_PREFIX).values_list(
                    "client_id", flat=True
                )
            )
            for number in range(1, devices + 1):
                # Draw every random value even for devices that exist, so the fleet does not depend on
                # which devices were there before.
                model_name = DEMO_MODELS[(number - 1) % len(DEMO_MODELS)][0]
                firmware = rng.choice(FIRMWARE[model_name])
                device_groups = rng.sample(groups, k=rng.choice([0, 1, 1, 2]))
                mac = ":".join(["02"] + [f"{rng.randrange(256):02x}" for _ in range(5)])  # locally administered
                seen = rng.random()
                client_id = f"{fleet_prefix}{DEVICE_PREFIX}{number:03d}"
                if client_id in existing:
                    continue
                device = device_create(
                    actor=None,
                    client_id=client_id,
                    name=f"{model_name} #{number}",
                    model=models[model_name],
                    groups=device_groups,
                    serial=f"{model_name[:2].upper()}{2026_0000 + number * 37}",
                    mac=mac,
                    firmware_version=firmware,
                )
                # last_seen is telemetry state that the MQTT consumer maintains, not an operator's edit:
                # set it directly, the way the consumer does.
                if seen < 0.4:
                    last_seen = now - timedelta(seconds=rng.randrange(5, 600))  # seen in the last minutes
                elif seen < 0.8:
                    last_seen = now - timedelta(hours=rng.randrange(2, 24 * 30))  # seen long ago
                else:
                    last_seen = None  # never connected
                if last_seen is not None:
                    Device.objects.filter(pk=device.pk).update(last_seen=last_seen)
                created["devices"] += 1

        total = Device.objects.filter(client_id__startswith=fleet_prefix + DEVICE_PREFIX).count()
        if any(created.values()):
            self.stdout.write(
                self.style.SUCCESS(
                    f"Demo fleet: created {created['models']} models, {created['groups']} groups and "
                    f"{created['devices']} devices ({total} demo devices in total)."
                )
            )
        else:
            self.stdout.write(f"Demo fleet already present ({total} demo devices); nothing to add.")
