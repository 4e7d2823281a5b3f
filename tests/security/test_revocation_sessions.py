"""Issue 5, "proven" and "cleared": the broker's own word that a revoked device's live session was dropped, and the
purge of its persistent session and retained messages. Real Mosquitto, real worker, real device sessions."""

import threading

import paho.mqtt.client as mqtt
import pytest
from django.conf import settings
from django.test import Client

from devices.models import Device
from security import services
from security.brokers import get_adapter
from security.brokers.base import files_digest_bytes
from security.models import AuditEvent, BrokerState, DeviceAction, EnforcementChange
from security.revocation_sessions import revoked_sessions_purge
from tests.security import test_revocation as _revocation
from tests.security.test_revocation import action_state, api
from tests.support.broker import MqttClient
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# The fixtures of the revocation tests (a live device with a console-issued secret applied on the broker).
roles_present = _revocation.roles_present
live_device = _revocation.live_device


class PersistentDevice:
    """A device as fleetkeeper_device connects it: MQTT 3.1.1 with clean_session off (a persistent session)."""

    def __init__(self, port, client_id, secret):
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311, clean_session=False
        )
        self.client.username_pw_set(client_id, secret)
        self.port = port
        self.connack = None
        self.messages = []
        self._lock = threading.Lock()
        self.client.on_connect = lambda _c, _u, flags, reason, _p: setattr(
            self, "connack", (flags.session_present, reason.value)
        )

        def on_message(_c, _u, message):
            with self._lock:
                self.messages.append((message.topic, message.payload))

        self.client.on_message = on_message
        self.subacks = []
        self.client.on_subscribe = lambda _c, _u, mid, _codes, _p: self.subacks.append(mid)

    def connect(self):
        self.client.connect("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()
        assert wait_until(lambda: self.connack is not None, timeout=5)
        return self.connack

    def close(self):
        if self.client.is_connected():
            self.client.disconnect()
        self.client.loop_stop()


def _verified(record_id, celery_worker):
    assert wait_until(lambda: action_state(record_id) == "verified", timeout=15), celery_worker.log()[-3000:]
    return DeviceAction.objects.get(pk=record_id)


def test_revocation_records_the_brokers_word_that_the_live_session_was_dropped(
    live_device, mosquitto, support, celery_worker
):
    _device, secret = live_device("device-sess1")
    session = MqttClient(mosquitto.port, client_id="device-sess1", username="device-sess1", password=secret)
    # The trap: one username is one session. The console's monitor is connected throughout; the evidence must come
    # from another identity, or the revocation would kick the monitor off the broker.
    monitor = MqttClient(
        mosquitto.port,
        client_id=settings.MQTT_MONITOR_USERNAME,
        username=settings.MQTT_MONITOR_USERNAME,
        password=settings.MQTT_MONITOR_PASSWORD,
    )
    assert session.connect() == 0 and monitor.connect() == 0
    try:
        response = api(support).post("/api/v1/devices/device-sess1/revoke/", {"reason": "cloned"}, format="json")
        assert response.status_code == 202, response.content
        assert session.wait_disconnected(timeout=2.0)
        record = _verified(response.json()["id"], celery_worker)
        evidence = record.evidence["session"]
        assert evidence["observed"] is True and evidence["state"] == "dropped", evidence
        assert evidence["line"] == "Client device-sess1 disconnected."
        assert "session dropped at" in evidence["summary"] and evidence["at"]
        assert evidence["after_reload_signal_ms"] >= 0
        # The broker's own log has the line (its stdout log, independent of the watcher).
        assert "Client device-sess1 disconnected." in mosquitto.log()
        assert monitor.is_connected, "the session watcher took over the monitor's session"
        assert "Client fleetkeeper-monitor already connected" not in mosquitto.log()
    finally:
        session.close()
        monitor.close()
    audited = AuditEvent.objects.get(action="device.revoke_verified", object_id="device-sess1")
    assert audited.after["session"]["state"] == "dropped"
    page = Client()
    page.force_login(support)
    html = page.get("/devices/device-sess1/").content.decode()
    assert "session dropped at" in html


def test_revocation_of_a_device_that_is_not_connected_says_so(live_device, mosquitto, support, celery_worker):
    live_device("device-sess2")
    response = api(support).post("/api/v1/devices/device-sess2/revoke/", {"reason": "lost"}, format="json")
    assert response.status_code == 202
    record = _verified(response.json()["id"], celery_worker)
    evidence = record.evidence["session"]
    assert evidence["observed"] is True and evidence["state"] == "not_connected", evidence
    page = Client()
    page.force_login(support)
    assert "no live session" in page.get("/devices/device-sess2/").content.decode()


def _loaded_matches_applied() -> bool:
    loaded = get_adapter().loaded_bytes()
    digest = files_digest_bytes(config=loaded.config, passwd=loaded.passwd, acl=loaded.acl)
    return digest == BrokerState.load().applied_digest


def test_purge_discards_the_persistent_session_and_clears_retained_messages(
    live_device, mosquitto, support, operator, celery_worker
):
    port = mosquitto.port
    device, secret = live_device("device-purge1")
    first = PersistentDevice(port, "device-purge1", secret)
    assert first.connect() == (False, 0)
    _, subscribed = first.client.subscribe("rx/device-purge1/#", qos=1)
    first.client.publish("tx/device-purge1/status", b'{"firmware": "1.0"}', qos=1, retain=True).wait_for_publish(5)
    # The subscription is part of the persistent session once its SUBACK is back.
    assert wait_until(lambda: subscribed in first.subacks, timeout=5), "no SUBACK for rx/device-purge1/#"
    first.close()
    # A command queued for the offline device in its persistent session.
    commander = MqttClient(
        port,
        client_id=settings.MQTT_COMMANDER_USERNAME,
        username=settings.MQTT_COMMANDER_USERNAME,
        password=settings.MQTT_COMMANDER_PASSWORD,
    )
    assert commander.connect() == 0
    commander.publish("rx/device-purge1/command", b'{"command": "reboot"}', qos=1)
    commander.close()

    response = api(support).post("/api/v1/devices/device-purge1/revoke/", {"reason": "stolen"}, format="json")
    record = _verified(response.json()["id"], celery_worker)
    assert record.evidence["purge"]["state"] == "pending"

    outcome = revoked_sessions_purge(force=True)
    assert outcome["purged"] == 1, outcome
    purge = DeviceAction.objects.get(pk=record.pk).evidence["purge"]
    assert purge["state"] == "done", purge
    # The broker said it held a session for the device, delivered its queued command into the purge (discarded),
    # and had one retained message on the device's channels, now cleared.
    assert purge["session_present"] is True and purge["queued_discarded"] == 1
    assert purge["retained_cleared"] == ["tx/device-purge1/status"]
    assert AuditEvent.objects.filter(action="device.revoke_purged", object_id="device-purge1").exists()
    # A broker-log reader can tell this login from the revoked device coming back.
    from security.revocation_sessions import purge_expected

    assert purge_expected("device-purge1") and not purge_expected("device-sess1")
    # The one-time line and grants are gone again: the files are exactly what the last apply wrote.
    loaded = get_adapter().loaded_files()
    assert "device-purge1:" not in loaded.passwd and "Session purge" not in loaded.acl
    assert _loaded_matches_applied()

    # A retained message on its tx channel is no longer delivered to a new subscriber.
    reader = MqttClient(
        port,
        client_id=settings.MQTT_CONSUMER_USERNAME,
        username=settings.MQTT_CONSUMER_USERNAME,
        password=settings.MQTT_CONSUMER_PASSWORD,
    )
    assert reader.connect() == 0
    try:
        reader.subscribe("tx/+/status")
        assert not reader.wait_for(lambda msgs: any(m.topic == "tx/device-purge1/status" for m in msgs), 1.0)
    finally:
        reader.close()

    # Re-issued: the device connecting with the same client id and clean_session off finds no session, no command.
    services.device_reinstate(actor=operator, device=Device.objects.get(pk=device.pk), reason="repaired")
    issued = services.credential_issue(actor=operator, device=Device.objects.get(pk=device.pk))
    assert wait_until(lambda: EnforcementChange.objects.get(pk=issued.change.pk).state == "applied", timeout=15)
    again = PersistentDevice(port, "device-purge1", issued.password)
    try:
        assert again.connect() == (False, 0)
        again.client.subscribe("rx/device-purge1/#", qos=1)
        assert not wait_until(lambda: again.messages, timeout=1.0)
    finally:
        again.close()


def test_purge_never_touches_a_device_that_came_back(live_device, mosquitto, support, operator, celery_worker):
    device, _secret = live_device("device-purge2")
    response = api(support).post("/api/v1/devices/device-purge2/revoke/", {"reason": "stolen"}, format="json")
    record = _verified(response.json()["id"], celery_worker)
    services.device_reinstate(actor=operator, device=Device.objects.get(pk=device.pk), reason="found it")
    assert wait_until(lambda: services._pending_max_id() is None, timeout=15)
    assert revoked_sessions_purge(force=True)["purged"] == 0
    assert DeviceAction.objects.get(pk=record.pk).evidence["purge"]["state"] == "skipped"
    assert "device-purge2:" not in get_adapter().loaded_files().passwd


def test_purge_lines_left_by_a_crash_are_removed_by_the_reconcile(live_device, mosquitto, support, celery_worker):
    """A console that dies between adding the one-time line and removing it: the database never renders the line,
    so the next reconcile takes it out (and the secret died with the process)."""
    from security.brokers.files import derive_policy
    from security.enforcement.secrets import hash_secret

    live_device("device-purge3")
    response = api(support).post("/api/v1/devices/device-purge3/revoke/", {"reason": "stolen"}, format="json")
    _verified(response.json()["id"], celery_worker)
    adapter = get_adapter()
    crashed = derive_policy(
        adapter.loaded_bytes(),
        probe_username=settings.MQTT_PROBE_USERNAME,
        probe_secret=settings.MQTT_PROBE_PASSWORD,
        iterations=1,
        add=(("device-purge3", hash_secret("one-time, lost with the process", iterations=1)),),
    )
    assert adapter.apply(crashed).probe.ok
    assert "device-purge3:" in adapter.loaded_files().passwd
    outcome = services.broker_reconcile(trigger="test")
    assert outcome["repaired"] is True
    assert "device-purge3:" not in adapter.loaded_files().passwd
    assert _loaded_matches_applied()


@pytest.mark.django_db
def test_purge_waits_for_a_quiet_broker_but_not_forever(support, settings):
    from datetime import timedelta

    from django.utils import timezone

    from security.revocation_sessions import _defer_seconds
    from tests.factories import DeviceFactory

    settings.REVOCATION_PURGE_QUIET_SECONDS = 10
    settings.REVOCATION_PURGE_MAX_DELAY_SECONDS = 300
    device = DeviceFactory(client_id="device-quiet1")
    row = DeviceAction(client_id=device.client_id, action="revoke", verified_at=timezone.now())
    EnforcementChange.objects.create(kind="device.revoke", client_id="device-other", state="applied")
    assert 0 < _defer_seconds([row]) <= 10  # a revocation a moment ago: wait for the quiet period
    EnforcementChange.objects.create(kind="bulk.revoke", state="pending")
    assert _defer_seconds([row]) > 0  # one pending: it goes first
    row.verified_at = timezone.now() - timedelta(seconds=301)
    assert _defer_seconds([row]) == 0  # never later than the maximum delay
    EnforcementChange.objects.all().delete()
    row.verified_at = timezone.now()
    assert _defer_seconds([row]) == 0  # a quiet broker: now
