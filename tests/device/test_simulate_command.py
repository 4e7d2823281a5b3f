"""manage.py simulate: takes devices of the fleet, issues each a fresh credential (audited as the simulator
service), and runs them against the real broker, one of them hostile."""

import io
import json
import threading
import time

import pytest
from django.core.management import CommandError, call_command
from django.db import connection

from devices.models import Device
from security import services
from security.models import AuditEvent, DeviceCredential
from tests.factories import DeviceFactory

pytestmark = [pytest.mark.integration]


def apply_when_issued(count, stop):
    """The worker's part, run in a thread: once the credentials exist, load them into the broker."""
    try:
        while not stop.is_set() and DeviceCredential.objects.count() < count:
            time.sleep(0.05)
        if not stop.is_set():
            services.enforcement_apply(coalesce=False)
    finally:
        connection.close()


@pytest.mark.django_db(transaction=True)
def test_simulate_runs_fleet_devices_with_audited_credentials_against_the_broker(mosquitto):
    for i in range(3):
        DeviceFactory(client_id=f"device-fleet-{i}", firmware_version="3.1.0")
    DeviceFactory(client_id="device-fleet-9-revoked", status=Device.Status.REVOKED)
    stop = threading.Event()
    applier = threading.Thread(target=apply_when_issued, args=(3, stop))
    applier.start()
    out, err = io.StringIO(), io.StringIO()
    try:
        # Four are asked for, three are active: it simulates those three and says so.
        call_command(
            "simulate",
            devices=4,
            hostile=1,
            duration=4,
            rate=3,
            seed=5,
            hostile_interval=0.3,
            json=True,
            stdout=out,
            stderr=err,
        )
    finally:
        stop.set()
        applier.join(10)
    assert "The fleet has 3 active devices, 4 were asked for: simulating 3." in err.getvalue()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("Issued 3 credentials (audited as service:simulator)")
    assert "hostile: device-fleet-" in lines[0]
    assert sum(line.startswith("[") for line in lines) >= 3
    summary = json.loads(lines[-1])
    assert summary["devices"] == 3 and len(summary["hostile"]) == 1
    assert summary["max_connected"] == 3
    assert summary["hostile_stats"]["attempts"] >= 2
    assert summary["breaches"] == 0 and summary["leaked"] == 0
    issued = AuditEvent.objects.filter(actor_label="service:simulator", action__startswith="credential.")
    assert sorted(issued.values_list("object_id", flat=True)) == [f"device-fleet-{i}" for i in range(3)]
    assert not DeviceCredential.objects.filter(device__client_id="device-fleet-9-revoked").exists()


@pytest.mark.django_db
def test_simulate_says_what_to_do_when_the_fleet_has_no_active_device():
    DeviceFactory(client_id="device-gone-1", status=Device.Status.DECOMMISSIONED)
    with pytest.raises(CommandError, match="The fleet has no active devices: add some"):
        call_command("simulate", devices=5, stdout=io.StringIO())
    assert not DeviceCredential.objects.exists()


@pytest.mark.django_db
def test_simulate_refuses_more_hostile_devices_than_devices():
    with pytest.raises(CommandError, match="--hostile must be between 0 and --devices"):
        call_command("simulate", devices=2, hostile=3, stdout=io.StringIO())
