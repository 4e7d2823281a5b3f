"""Deleting a device is an enforcement change: its live session is dropped and its secret stops working."""

import pytest

from devices import services as device_services
from security import services
from security.models import EnforcementChange
from tests.factories import DeviceFactory
from tests.support.broker import MqttClient, raw_connect_code

pytestmark = [pytest.mark.integration, pytest.mark.django_db]


def test_deleting_a_device_drops_its_session_and_refuses_its_secret(mosquitto, operator):
    device = DeviceFactory(client_id="device-gone")
    secret = services.credential_issue(actor=operator, device=device).password
    assert services.enforcement_apply(coalesce=False).probe.ok

    session = MqttClient(mosquitto.port, client_id="device-gone", username="device-gone", password=secret)
    assert session.connect() == 0
    try:
        device_services.device_delete(actor=operator, device=device)
        change = EnforcementChange.objects.get(kind="device.delete", client_id="device-gone")
        assert change.state == EnforcementChange.State.PENDING

        result = services.enforcement_apply(coalesce=False)
        assert result.probe.ok
        assert session.wait_disconnected(timeout=3)
    finally:
        session.close()
    assert raw_connect_code(mosquitto.port, client_id="device-gone", username="device-gone", password=secret) != 0
    change.refresh_from_db()
    assert change.state == EnforcementChange.State.APPLIED
