"""Payload encryption on the console: payload keys (issued once, encrypted at rest, audited), the consumer opening
sealed payloads and refusing tampered, replayed and clear ones — first through the consumer's own fold (real Redis,
real database), then end to end: real Mosquitto, a real Celery worker running the consumer, real DeviceClients."""

import json
import time

import pytest
import redis
from django.conf import settings
from django.core.exceptions import PermissionDenied, ValidationError

from devices.models import Device
from fleetkeeper_device import protocol, sealing
from security import payloads
from security.detection.consumer import Consumer
from security.models import Alert, AuditEvent, DeviceActivity, PayloadKey
from tests.factories import DeviceFactory
from tests.security import test_detection_integration as detection
from tests.support.detection import ON_CONNECT, fleet, ingested, simulate
from tests.support.waiting import wait_until

DEVICE_TO_CONSOLE = sealing.DEVICE_TO_CONSOLE


def telemetry(seq: int, value: float = 21.5) -> bytes:
    return protocol.encode_telemetry(message_id=f"m-{seq}", ts=time.time(), seq=seq, values={"temperature": value})


def seal(key_text, client_id, counter, plaintext, channel="telemetry"):
    topic = f"tx/{client_id}/{channel}"
    return sealing.PayloadKey(key_text).seal(
        plaintext, topic=topic, client_id=client_id, counter=counter, direction=DEVICE_TO_CONSOLE
    )


def kinds(client_id):
    return set(Alert.objects.filter(client_id=client_id).values_list("kind", flat=True))


@pytest.fixture
def clean_redis():
    r = redis.Redis.from_url(settings.REDIS_URL)
    for key in r.scan_iter(f"{settings.DETECTION_REDIS_PREFIX}:*"):
        r.delete(key)
    return r


# --- keys: issue, at rest, audit, permissions ----------------------------------------------------------------------


@pytest.mark.django_db
def test_issue_shows_the_key_once_stores_it_encrypted_and_audits_without_it(operator):
    device = DeviceFactory()
    issued = payloads.payload_key_issue(actor=operator, device=device)
    raw = sealing.decode_key(issued.key_text)
    row = PayloadKey.objects.get(device=device)
    assert row.state == "active" and row.key_id == sealing.key_id(raw).hex() == issued.key_id
    assert issued.key_text not in row.encrypted_key and raw.hex() not in row.encrypted_key
    assert payloads.key_decrypt(row.encrypted_key, client_id=device.client_id, key_id=row.key_id) == raw
    # Bound to its row: the ciphertext moved to another device's row does not decrypt.
    with pytest.raises(payloads.PayloadKeyUnreadable, match="PAYLOAD_KEYS_SECRET"):
        payloads.key_decrypt(row.encrypted_key, client_id="device-other", key_id=row.key_id)
    event = AuditEvent.objects.get(action="payload_key.issue")
    assert event.object_id == device.client_id and event.after["key_id"] == row.key_id
    assert issued.key_text not in json.dumps([event.before, event.after])

    again = payloads.payload_key_issue(actor=operator, device=device, required=True)
    assert again.replaced == row.key_id and again.key_text != issued.key_text
    assert list(PayloadKey.objects.filter(device=device).values_list("state", flat=True)) == ["active", "retired"]
    assert AuditEvent.objects.filter(action="payload_key.reissue").count() == 1


@pytest.mark.django_db
def test_a_changed_secret_is_a_clear_error(operator, settings):
    device = DeviceFactory()
    payloads.payload_key_issue(actor=operator, device=device)
    row = PayloadKey.objects.get(device=device)
    settings.PAYLOAD_KEYS_SECRET = "another-secret"
    with pytest.raises(payloads.PayloadKeyUnreadable, match="restore it, or issue the device a new payload key"):
        payloads.key_decrypt(row.encrypted_key, client_id=device.client_id, key_id=row.key_id)


@pytest.mark.django_db
def test_support_and_auditor_cannot_issue_and_revoked_devices_get_none(support, auditor, operator):
    device = DeviceFactory()
    for user in (support, auditor):
        with pytest.raises(PermissionDenied):
            payloads.payload_key_issue(actor=user, device=device)
    Device.objects.filter(pk=device.pk).update(status=Device.Status.REVOKED)
    device.refresh_from_db()
    with pytest.raises(ValidationError, match="reinstate it"):
        payloads.payload_key_issue(actor=operator, device=device)
    assert not PayloadKey.objects.exists()


@pytest.mark.django_db
def test_console_to_device_messages_use_fresh_counters(operator):
    device = DeviceFactory()
    issued = payloads.payload_key_issue(actor=operator, device=device)
    topic = f"rx/{device.client_id}/credentials"
    receiver = sealing.DeviceSealer(issued.key_text, device.client_id)
    first = payloads.payload_seal_for_device(device=device, topic=topic, plaintext=b"one")
    second = payloads.payload_seal_for_device(device=device, topic=topic, plaintext=b"two")
    assert [sealing.peek(m).counter for m in (first, second)] == [1, 2]
    assert receiver.open(topic, first) == b"one" and receiver.open(topic, second) == b"two"
    with pytest.raises(sealing.Replayed):
        receiver.open(topic, first)


# --- the consumer's fold (real Redis and database, no broker) ------------------------------------------------------


@pytest.fixture
def keyed(operator, clean_redis):
    """Two devices with payload keys and a consumer that knows them."""
    devices = [DeviceFactory(), DeviceFactory()]
    keys = {d.client_id: payloads.payload_key_issue(actor=operator, device=d).key_text for d in devices}
    consumer = Consumer(replica=1, monitor=False)
    consumer.payload_keys.refresh(force=True)
    return consumer, keys


def feed(consumer, *messages):
    consumer.process([(f"tx/{cid}/{channel}".encode(), payload, time.time()) for cid, channel, payload in messages])


@pytest.mark.django_db(transaction=True)
def test_sealed_telemetry_is_opened_and_ingested(keyed):
    consumer, keys = keyed
    a, b = keys
    feed(consumer, *[(a, "telemetry", seal(keys[a], a, n, telemetry(n))) for n in range(1, 6)])
    from security.detection.ingest import flush_pending

    flush_pending(consumer)
    assert DeviceActivity.objects.get(client_id=a).telemetry == 5
    assert DeviceActivity.objects.get(client_id=a).malformed == 0
    assert Device.objects.get(client_id=a).last_seen is not None
    assert consumer.stats.sealed_opened == 5 and not Alert.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_each_refusal_is_its_own_alert_for_the_right_device(keyed, clean_redis):
    consumer, keys = keyed
    a, b = keys
    good = seal(keys[a], a, 1, telemetry(1))
    tampered = bytearray(seal(keys[a], a, 2, telemetry(2)))
    tampered[-5] ^= 1
    feed(consumer, (a, "telemetry", good), (a, "telemetry", good), (a, "telemetry", bytes(tampered)))
    assert kinds(a) == {"payload_replayed", "payload_tampered"} and kinds(b) == set()
    replayed = Alert.objects.get(client_id=a, kind="payload_replayed")
    assert replayed.evidence["counts"]["replayed"] == 1 and replayed.evidence["samples"][0]["counter"] == 1
    assert Alert.objects.get(client_id=a, kind="payload_tampered").evidence["samples"][0]["reason"] == "tampered"
    # b's sealed message moved onto a's topic: a's key does not even match.
    feed(consumer, (a, "telemetry", seal(keys[b], b, 1, telemetry(1))))
    samples = Alert.objects.get(client_id=a, kind="payload_tampered").evidence["samples"]
    assert [s["reason"] for s in samples] == ["tampered", "wrong_key"]
    totals = {k.decode(): int(v) for k, v in clean_redis.hgetall(f"{settings.DETECTION_REDIS_PREFIX}:p:{a}").items()}
    assert totals == {"sealed": 1, "replayed": 1, "tampered": 2}


@pytest.mark.django_db(transaction=True)
def test_a_replay_seen_by_another_replica_is_caught_by_the_shared_window(keyed):
    consumer, keys = keyed
    a, _b = keys
    other = Consumer(replica=1, monitor=False)  # another process: its own in-memory window, the same Redis
    other.payload_keys.refresh(force=True)
    message = seal(keys[a], a, 7, telemetry(7))
    feed(consumer, (a, "telemetry", message))
    assert kinds(a) == set()
    feed(other, (a, "telemetry", message), (a, "telemetry", seal(keys[a], a, 6, telemetry(6))))  # 6: reordered, fine
    alert = Alert.objects.get(client_id=a, kind="payload_replayed")
    assert alert.evidence["counts"]["replayed"] == 1 and alert.evidence["highest_counter"] == 7


@pytest.mark.django_db(transaction=True)
def test_clear_text_is_refused_only_when_required(keyed, operator, settings):
    consumer, keys = keyed
    a, b = keys
    feed(consumer, (a, "telemetry", telemetry(1)))
    assert kinds(a) == set()  # the fleet default: a key, but clear text still accepted
    payloads.payload_key_set_required(actor=operator, device=Device.objects.get(client_id=a), required=True)
    consumer.payload_keys.refresh(force=True)
    feed(consumer, (a, "telemetry", telemetry(2)), (b, "telemetry", telemetry(2)))
    assert kinds(a) == {"payload_unencrypted"} and kinds(b) == set()
    assert AuditEvent.objects.filter(action="payload_key.require", object_id=a).exists()


@pytest.mark.django_db(transaction=True)
def test_a_key_issued_after_the_cache_was_loaded_is_picked_up_without_losing_messages(keyed, operator):
    consumer, _keys = keyed
    late = DeviceFactory()
    text = payloads.payload_key_issue(actor=operator, device=late).key_text
    feed(consumer, *[(late.client_id, "telemetry", seal(text, late.client_id, n, telemetry(n))) for n in (1, 2)])
    assert kinds(late.client_id) == set()
    from security.detection.ingest import flush_pending

    flush_pending(consumer)
    assert DeviceActivity.objects.get(client_id=late.client_id).telemetry == 2


@pytest.mark.django_db(transaction=True)
def test_sealed_bytes_from_a_device_without_a_key_are_malformed_and_a_forged_key_is_tampered(keyed):
    consumer, keys = keyed
    a, _b = keys
    stranger = DeviceFactory()  # no payload key: the console does not expect sealed messages from it
    forged = sealing.encode_key(sealing.generate_key())
    feed(consumer, (stranger.client_id, "telemetry", seal(forged, stranger.client_id, 1, telemetry(1))))
    alert = Alert.objects.get(client_id=stranger.client_id)
    assert alert.kind == "malformed_messages" and "no payload key" in alert.summary
    feed(consumer, (a, "telemetry", seal(forged, a, 1, telemetry(1))))  # a has a key; this is not it
    alert = Alert.objects.get(client_id=a)
    assert alert.kind == "payload_tampered" and alert.evidence["samples"][0]["reason"] == "wrong_key"


# --- end to end: real Mosquitto, a real Celery worker running the consumer, real DeviceClients ----------------------
# The worker, broker and fleet helpers are the detection suite's (one definition): its fixtures, used here.
broker = detection.broker
detection_worker = detection.detection_worker


def keyed_fleet(operator, n, *, hostile=0, required=None):
    """The detection suite's fleet, each device with a payload key (DeviceSpec.payload_key)."""
    import dataclasses

    specs = fleet(operator, n, hostile=hostile)
    return [
        dataclasses.replace(
            spec,
            payload_key=payloads.payload_key_issue(
                actor=operator, device=Device.objects.get(client_id=spec.client_id), required=required
            ).key_text,
        )
        for spec in specs
    ]


def device_client(broker, spec, **kwargs):
    from fleetkeeper_device import DeviceClient

    client = DeviceClient(spec.client_id, host="127.0.0.1", port=broker.port, secret=spec.secret, **kwargs)
    client.start()
    assert client.wait_connected(10), client.stats
    return client


def activity(client_id):
    return DeviceActivity.objects.filter(client_id=client_id).first()


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_sealed_telemetry_is_ingested_and_a_replayed_capture_raises_exactly_payload_replayed(broker, operator):
    honest, replayer = keyed_fleet(operator, 2)
    clients = [device_client(broker, spec, payload_key=spec.payload_key) for spec in (honest, replayer)]
    try:
        for seq in range(5):
            for client in clients:
                assert client.publish_telemetry({"temperature": 20.0 + seq})
        assert wait_until(lambda: all(c.stats["telemetry"] == 5 for c in clients))  # published on the reactor thread
        capture = clients[1].last_telemetry
        assert sealing.is_sealed(capture) and b"temperature" not in capture
        assert wait_until(
            lambda: all((activity(s.client_id) or DeviceActivity()).telemetry == 5 for s in (honest, replayer))
        )
        assert Device.objects.get(client_id=honest.client_id).last_seen is not None
        # The captured sealed message, re-sent by whoever holds the device's MQTT login: the broker accepts it.
        clients[1].mqtt.publish(clients[1].telemetry_topic, capture, qos=1).wait_for_publish(5)
        assert wait_until(lambda: kinds(replayer.client_id) == {"payload_replayed"})
        for client in clients:
            assert client.publish_telemetry({"temperature": 30.0})
        assert wait_until(lambda: (activity(honest.client_id) or DeviceActivity()).telemetry == 6)
        assert wait_until(lambda: activity(replayer.client_id).telemetry == 6)  # the replay was not counted
    finally:
        for client in clients:
            client.stop()
    assert kinds(replayer.client_id) == {"payload_replayed"} and kinds(honest.client_id) == set()
    alert = Alert.objects.get(client_id=replayer.client_id)
    assert alert.device.client_id == replayer.client_id and alert.evidence["counts"]["replayed"] == 1
    assert alert.evidence["samples"][0]["counter"] == sealing.peek(capture).counter
    assert activity(honest.client_id).malformed == 0


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_hostile_device_replaying_and_tampering_raises_exactly_those_and_honest_sealed_devices_none(broker, operator):
    specs = keyed_fleet(operator, 3, hostile=1)
    hostile = specs[0].client_id
    result = simulate(broker, specs, attacks=("replay", "tamper"), duration=4.0)
    assert result["hostile_stats"].get("tampered_own_topic", 0) >= 1, result["hostile_stats"]
    assert result["hostile_stats"].get("replayed_own_topic", 0) >= 1, result["hostile_stats"]
    wanted = ON_CONNECT | {"payload_replayed", "payload_tampered"}
    assert wait_until(lambda: kinds(hostile) >= wanted, timeout=10), kinds(hostile)
    assert ingested(specs, result), "the consumer never recorded the simulation's telemetry"
    assert kinds(hostile) == wanted
    assert Alert.objects.get(client_id=hostile, kind="payload_tampered").evidence["samples"][0]["reason"] == "tampered"
    for spec in specs[1:]:
        assert kinds(spec.client_id) == set()
        assert wait_until(lambda spec=spec: (activity(spec.client_id) or DeviceActivity()).telemetry >= 5)
        assert activity(spec.client_id).malformed == 0


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_clear_text_from_a_device_that_must_seal_raises_payload_unencrypted(broker, operator):
    must, may = keyed_fleet(operator, 2)
    payloads.payload_key_set_required(
        actor=operator, device=Device.objects.get(client_id=must.client_id), required=True
    )
    clients = [device_client(broker, spec) for spec in (must, may)]  # both forgot their keys: clear text

    rounds = []

    def publish_until_alerted():
        # The worker's consumer re-reads changed keys every PAYLOAD_KEYS_REFRESH_SECONDS (10): the flag set just now
        # takes effect within that.
        for client in clients:
            assert client.publish_telemetry({"temperature": 21.0})
        rounds.append(1)
        return kinds(must.client_id) == {"payload_unencrypted"}

    try:
        assert wait_until(publish_until_alerted, timeout=settings.PAYLOAD_KEYS_REFRESH_SECONDS + 10, interval=0.1)
        # publish_telemetry hands over to the reactor thread: wait until the last ones have gone out.
        assert wait_until(lambda: clients[1].stats["telemetry"] == len(rounds)), clients[1].stats
        sent = len(rounds)
        assert wait_until(lambda: (activity(may.client_id) or DeviceActivity()).telemetry >= sent)
        before = (activity(must.client_id) or DeviceActivity()).telemetry
        assert clients[0].publish_telemetry({"temperature": 21.0})
        assert wait_until(lambda: Alert.objects.get(client_id=must.client_id).occurrences >= 2)
        # A later database flush: had the refused message been ingested, it would be counted by now.
        assert clients[1].publish_telemetry({"temperature": 21.0})
        assert wait_until(lambda: activity(may.client_id).telemetry >= sent + 1)
    finally:
        for client in clients:
            client.stop()
    assert kinds(must.client_id) == {"payload_unencrypted"} and kinds(may.client_id) == set()
    alert = Alert.objects.get(client_id=must.client_id)
    assert alert.evidence["counts"]["unencrypted"] >= 2
    assert activity(must.client_id).telemetry == before  # dropped, not ingested, once refused


@pytest.mark.django_db
def test_simulate_issues_payload_keys_when_asked_audited_as_the_simulator():
    from devices.management.commands.simulate import issue_simulator_credentials

    devices = [DeviceFactory(), DeviceFactory()]
    plain = issue_simulator_credentials(devices)
    assert all(spec.payload_key is None for spec in plain) and not PayloadKey.objects.exists()
    specs = issue_simulator_credentials(devices, payload_keys=True)
    for spec in specs:
        row = PayloadKey.objects.get(client_id=spec.client_id, state="active")
        assert sealing.PayloadKey(spec.payload_key).key_id_hex == row.key_id
    events = AuditEvent.objects.filter(action="payload_key.issue")
    assert events.count() == 2 and set(events.values_list("actor_label", flat=True)) == {"service:simulator"}
