"""`manage.py consume` alone (the debugging entry point) against the real broker: it connects, counts a device's
messages into the database and stops by itself."""

import os
import subprocess
import sys
import time

import pytest
from django.conf import settings
from django.db import connection

from fleetkeeper_device import protocol
from security import services
from security.models import DeviceActivity
from tests.factories import DeviceFactory
from tests.support.broker import MqttClient

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def test_consume_runs_alone_and_records_what_a_device_sends(mosquitto, operator):
    device = DeviceFactory()
    secret = services.credential_issue(actor=operator, device=device).password
    assert services.enforcement_apply(coalesce=False).probe.ok
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "fleet.settings_test",
        "FLEET_TEST_DB_NAME": str(connection.settings_dict["NAME"]),
        "DETECTION_FLUSH_SECONDS": "0.2",
        "DETECTION_DB_FLUSH_SECONDS": "0.2",
    }
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "consume", "--duration", "6", "--report-every", "1"],
        cwd=settings.BASE_DIR,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert mosquitto.wait_for_log(f"{settings.MQTT_CONSUMER_USERNAME} 1 $share/", timeout=10)
        client = MqttClient(mosquitto.port, client_id=device.client_id, username=device.client_id, password=secret)
        assert client.connect() == 0
        for seq in range(25):
            payload = protocol.encode_telemetry(message_id=f"m-{seq}", ts=time.time(), seq=seq, values={"t": 1.0})
            client.client.publish(f"tx/{device.client_id}/telemetry", payload, qos=1)
        client.client.publish(f"tx/{device.client_id}/telemetry", b"not json", qos=1)
        out, _ = proc.communicate(timeout=30)
        client.close()
    finally:
        if proc.poll() is None:
            proc.kill()
    from fleet.celery import app

    app.control.purge()  # the enforcement task queued by the commit above ran inline here; it must not run later
    assert proc.returncode == 0, out
    assert "stopped:" in out and "received=26" in out.replace("'received': 26", "received=26")
    row = DeviceActivity.objects.get(client_id=device.client_id)
    assert (row.messages, row.telemetry, row.malformed) == (26, 25, 1)
