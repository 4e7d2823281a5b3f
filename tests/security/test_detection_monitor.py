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


def test_the_consoles_session_purge_login_is_not_an_unknown_client_but_a_revoked_device_is(consumer):
    from security.revocation_sessions import _purge_announce

    DeviceFactory(client_id="device-purged", status="revoked")
    DeviceFactory(client_id="device-back", status="revoked")
    _purge_announce(["device-purged"])  # what the purge does before it logs in as the revoked device
    feed(consumer, connected("device-purged", p=5, c=0), connected("device-back", port=40001))
    assert set(Alert.objects.values_list("kind", "client_id")) == {("unknown_client", "device-back")}


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


# --- denied publishes, read from the broker's debug log file (DETECTION_DENIED_PUBLISHES) ---------------------

DENIED = "Denied PUBLISH from {id} (d0, q1, r0, m3, '{topic}', ... (57 bytes))"


def test_a_denied_publish_line_is_parsed_with_its_topic_even_when_the_topic_has_quotes():
    from security.detection import rules

    event = rules.parse_log_line("1795331526: " + DENIED.format(id="dev-a", topic="tx/dev-b/it's"))
    assert (event.kind, event.client_id, event.topic_filter, event.qos, event.size) == (
        "denied_publish",
        "dev-a",
        "tx/dev-b/it's",
        1,
        57,
    )


def test_the_debug_log_tail_finds_denied_publishes_across_partial_writes_and_truncates(tmp_path):
    from security.detection.monitor import DebugLogTail

    path = tmp_path / "broker-debug.log"
    path.write_bytes(
        b"1: old line before the monitor started\n1: " + DENIED.format(id="old", topic="x").encode() + b"\n"
    )
    tail = DebugLogTail(str(path), max_bytes=4096, chunk=512)
    assert tail.read() == []  # an existing file is followed from its end: no stale alerts after a restart
    noise = b"1: Received PUBLISH from dev-x (d0, q0, r0, m0, 'tx/dev-x/telemetry', ... (200 bytes))\n" * 20
    denied = DENIED.format(id="dev-a", topic="tx/dev-b/telemetry").encode()
    with path.open("ab") as handle:
        handle.write(noise + b"1: " + denied[:20])  # the broker is mid-line
    assert tail.read() == []
    with path.open("ab") as handle:
        handle.write(denied[20:] + b"\n" + noise)
    assert tail.read() == [b"1: " + denied]
    with path.open("ab") as handle:  # past max_bytes: read, then cut
        handle.write(noise * 3 + b"1: " + denied + b"\n")
    assert tail.read() == [b"1: " + denied] and tail.truncations == 1 and path.stat().st_size == 0
    with path.open("ab") as handle:
        handle.write(b"1: " + denied + b"\n")
    assert tail.read() == [b"1: " + denied]
    path.unlink()  # the broker's directory was cleaned: a new file is read from its start
    assert tail.read() == []
    path.write_bytes(b"2: " + denied + b"\n")  # even with the same inode number and size
    assert tail.read() == [b"2: " + denied]


def test_denied_publishes_from_the_debug_log_are_one_publish_denied_alert_per_device(tmp_path):
    DeviceFactory(client_id="device-thief")
    with override_settings(DETECTION_DENIED_PUBLISHES=True, MQTT_BROKER_DIR=tmp_path, DETECTION_PROBE_HOLD_SECONDS=0.0):
        consumer = Consumer(replica=1, monitor=True)
        path = tmp_path / "broker-debug.log"
        lines = [
            DENIED.format(id="device-thief", topic="tx/device-victim/telemetry"),
            DENIED.format(id="device-thief", topic="rx/device-victim/command"),
            DENIED.format(id=settings.MQTT_PROBE_USERNAME, topic="tx/x/telemetry"),  # the console's own: ignored
        ]
        path.write_text("".join(f"1795331526: {line}\n" for line in lines))
        consumer.monitor.debug_log_read_at = 0.0
        consumer.monitor.tick()
    alert = Alert.objects.get()
    assert (alert.kind, alert.client_id, alert.severity, alert.occurrences) == (
        "publish_denied",
        "device-thief",
        "high",
        2,
    )
    assert alert.device.client_id == "device-thief"
    assert alert.evidence["target_client_id"] == "device-victim"
    assert [s["topic"] for s in alert.evidence["samples"]] == ["tx/device-victim/telemetry", "rx/device-victim/command"]


def test_messages_the_broker_drops_are_counted_and_each_increase_is_a_warning(consumer, caplog):
    class Message:
        topic = "$SYS/broker/publish/messages/dropped"

        def __init__(self, payload):
            self.payload = payload

    consumer._report()  # nothing heard from the broker yet: nothing to say
    consumer._on_log_message(None, None, Message(b"7"))  # the broker's count since it started: history
    consumer._report()
    assert consumer.stats.broker_dropped == 7 and "dropped" not in caplog.text
    consumer._on_log_message(None, None, Message(b"12"))
    consumer._report()
    assert "the broker dropped 5 more messages (12 since it started)" in caplog.text
    stored = redis.Redis.from_url(settings.REDIS_URL).hget(
        f"{settings.DETECTION_REDIS_PREFIX}:consumer:{consumer.username}", "broker_dropped"
    )
    assert stored == b"12"
