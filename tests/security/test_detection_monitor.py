"""The broker-log monitor and the batch ingest wired to real Redis and the database (no broker): log lines in
the broker's exact wording in, alerts out."""

import json
import time

import pytest
import redis
from django.conf import settings
from django.test import override_settings

from security.detection.consumer import Consumer
from security.models import Alert, DeviceActivity
from tests.factories import DeviceFactory

pytestmark = pytest.mark.django_db

LOG = "$SYS/broker/log/N"


@pytest.fixture
def consumer():
    r = redis.Redis.from_url(settings.REDIS_URL)
    for key in r.scan_iter(f"{settings.DETECTION_REDIS_PREFIX}:*"):
        r.delete(key)
    with override_settings(DETECTION_PROBE_HOLD_SECONDS=0.0):
        yield Consumer(replica=1, monitor=True)


def feed(consumer, *lines, topic=LOG):
    now = time.time()
    consumer.monitor.process([(topic, f"{int(now)}: {line}".encode(), now) for line in lines])
    consumer.monitor.tick()


def connected(client_id, address="10.0.0.5", port=40000, p=4, c=1, k=60):
    return f"New client connected from {address}:{port} as {client_id} (p{p}, c{c}, k{k}, u'{client_id}')."


def test_an_unknown_id_with_the_fleet_prefix_is_flagged_and_a_known_one_is_not(consumer):
    DeviceFactory(client_id="device-known")
    feed(consumer, connected("device-known"), connected("device-ghost", port=40001), connected("tool-x", port=40002))
    assert set(Alert.objects.values_list("kind", "client_id")) == {("unknown_client", "device-ghost")}


def test_two_alternating_fingerprints_on_one_id_are_a_cloned_credential(consumer):
    DeviceFactory(client_id="device-twin")
    a = connected("device-twin", address="10.0.0.5", k=60)
    b = connected("device-twin", address="192.168.7.9", k=30, c=0)
    feed(consumer, a)
    assert not Alert.objects.exists()
    feed(consumer, b)
    assert set(Alert.objects.values_list("kind", flat=True)) == {"fingerprint_changed"}
    feed(consumer, a, b)
    alert = Alert.objects.get(kind="credential_cloned")
    assert alert.device.client_id == "device-twin" and alert.severity == "critical"
    assert "192.168.7.0/24" in json.dumps(alert.evidence)


def test_refusals_followed_by_the_console_probe_are_not_an_attack(consumer):
    probe = settings.MQTT_PROBE_USERNAME
    feed(
        consumer,
        "New connection from 10.9.9.9:5000 on port 1883.",
        "Client <unknown> disconnected, not authorised.",
        "New connection from 10.9.9.9:5001 on port 1883.",
        connected(probe, address="10.9.9.9", port=5001),
    )
    assert not Alert.objects.exists()
    feed(consumer, "New connection from 10.7.7.7:6000 on port 1883.", "Client <unknown> disconnected, not authorised.")
    alert = Alert.objects.get()
    assert (alert.kind, alert.subject, alert.severity) == ("auth_failures", "10.7.7.7", "low")


def test_console_identities_are_never_flagged(consumer):
    feed(
        consumer,
        f"{settings.MQTT_PROBE_USERNAME} 1 #",
        f"{settings.MQTT_CONSUMER_USERNAME} 1 $share/x/tx/+/ack",
        topic="$SYS/broker/log/M/subscribe",
    )
    feed(consumer, f"Client {settings.MQTT_MONITOR_USERNAME} already connected, closing old connection.")
    assert not Alert.objects.exists()


def _telemetry(client_id, value, size_pad=0, seq=0):
    message = {"v": 1, "type": "telemetry", "id": f"m-{seq}", "ts": 1.0, "seq": seq, "values": {"temperature": value}}
    payload = json.dumps(message).encode() + b" " * size_pad
    return (f"tx/{client_id}/telemetry".encode(), payload, time.time())


@override_settings(DETECTION_VALUE_MIN_SAMPLES=20, DETECTION_DB_FLUSH_SECONDS=0)
def test_a_reading_far_outside_its_learned_range_is_flagged_once_per_reading(consumer):
    DeviceFactory(client_id="device-thermo")
    consumer.db_flush_seconds = 0
    consumer.process([_telemetry("device-thermo", 20.0 + (i % 5) / 10, seq=i) for i in range(40)])
    assert not Alert.objects.exists()
    for _ in range(3):
        consumer.process([_telemetry("device-thermo", 95.0, seq=99)])
    alert = Alert.objects.get()
    assert (alert.kind, alert.subject, alert.occurrences) == ("value_out_of_range", "device-thermo:temperature", 3)
    assert DeviceActivity.objects.get(client_id="device-thermo").telemetry == 43


def test_messages_far_larger_than_the_devices_usual_size_are_a_size_anomaly(consumer):
    DeviceFactory(client_id="device-big")
    with override_settings(DETECTION_WINDOW_SECONDS=1, DETECTION_BASELINE_MIN_WINDOWS=2, DETECTION_SIZE_MIN_BYTES=1000):
        consumer.thresholds = consumer.thresholds.__class__(
            min_windows=2, rate_factor=5, rate_min_excess=50, rate_absolute=150, size_factor=4, size_min_bytes=1000
        )
        for second in range(4):  # learn: small messages in several windows
            consumer.process([_telemetry("device-big", 20.0, seq=second)])
            time.sleep(1.0)
        consumer.process([_telemetry("device-big", 20.0, size_pad=8000, seq=9)])
    assert set(Alert.objects.values_list("kind", flat=True)) == {"size_anomaly"}
