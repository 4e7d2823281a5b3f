"""Detection end to end: a real Mosquitto (the project's rendered config), a real Celery worker running the MQTT
consumer as a bootstep, real Redis, and the device simulator's hostile behaviours. Judged by the alerts that
appear in the database, for which device, within a few seconds."""

import json
import random
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from django.conf import settings
from django.db import connection
from django.utils import timezone

from devices.models import Device
from fleetkeeper_device import protocol
from security.models import Alert, DeviceActivity
from security.tasks import detect_silent_devices
from tests.support.detection import (
    ON_CONNECT,
    QUEUE,
    broker_quiet,
    broker_watched,
    fleet,
    ingested,
    simulate,
    start_detection_worker,
)
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.django_db(transaction=True)]


@pytest.fixture(scope="module")
def detection_worker(django_db_setup, django_db_blocker):
    with django_db_blocker.unblock():
        db_name = connection.settings_dict["NAME"]
    worker = start_detection_worker(str(db_name))
    yield worker
    worker.stop()


@pytest.fixture
def broker(mosquitto, detection_worker):
    """The broker, with the worker's consumer and monitor connected and subscribed."""
    log_start = broker_watched(mosquitto, detection_worker)
    yield mosquitto
    broker_quiet(mosquitto, log_start)


def kinds_for(client_id):
    return set(Alert.objects.filter(client_id=client_id).values_list("kind", flat=True))


def alerts_for_others(specs, hostile_id):
    return list(Alert.objects.exclude(client_id=hostile_id).values_list("kind", "client_id", "subject"))


@pytest.mark.parametrize(
    ("attack", "expected"),
    [
        ("wildcard_subscribe", set()),
        ("flood", {"rate_anomaly"}),
        ("oversize", {"oversize_packet"}),
    ],
)
def test_hostile_behaviour_raises_exactly_its_alert_for_the_attacker(broker, operator, attack, expected):
    specs = fleet(operator, 3, hostile=1)
    hostile = specs[0].client_id
    result = simulate(broker, specs, attacks=(attack,), duration=3.0)
    wanted = ON_CONNECT | expected
    assert wait_until(lambda: kinds_for(hostile) >= wanted, timeout=8), kinds_for(hostile)
    # Anything else those messages were going to raise has been raised once the consumer has recorded them all.
    assert ingested(specs, result), "the consumer never recorded the simulation's telemetry"
    assert kinds_for(hostile) == wanted
    alert = Alert.objects.get(client_id=hostile, kind=next(iter(wanted - ON_CONNECT or wanted)))
    assert alert.device is not None and alert.device.client_id == hostile
    assert alert.state == Alert.State.OPEN and alert.evidence
    assert alerts_for_others(specs, hostile) == []


def test_wildcard_subscriptions_are_one_alert_with_every_filter_in_the_evidence(broker, operator):
    specs = fleet(operator, 2, hostile=1)
    hostile = specs[0].client_id
    simulate(broker, specs, attacks=("wildcard_subscribe",), duration=3.0)
    # Repeated attempts (on connect, then every attack) update the one open alert.
    assert wait_until(
        lambda: Alert.objects.filter(client_id=hostile, kind="subscription_violation", occurrences__gte=6).exists()
    ), "the wildcard attempts were not all counted on one alert"
    alert = Alert.objects.get(client_id=hostile, kind="subscription_violation")
    filters = {sample["filter"] for sample in alert.evidence["samples"]}
    assert filters == {"#", "+/#", "$SYS/#"}
    assert alert.evidence["counts"]["subscriptions"] == alert.occurrences


def test_brute_force_is_attributed_to_the_source_address_and_escalates(broker, operator):
    specs = fleet(operator, 3, hostile=1)
    hostile = specs[0].client_id
    simulate(broker, specs, attacks=("brute_force",), duration=3.0)
    assert wait_until(
        lambda: Alert.objects.filter(kind="auth_failures", subject="127.0.0.1", severity="high").exists(), timeout=8
    )
    alert = Alert.objects.get(kind="auth_failures", subject="127.0.0.1")
    # The broker logs no username for a refused login: the alert names the address, not a device.
    assert alert.device is None and alert.evidence["source_address"] == "127.0.0.1"
    assert alert.evidence["brute_force"] is True and alert.evidence["counts"]["failures"] >= 4
    assert Alert.objects.filter(kind="auth_failures").count() == 1
    assert kinds_for(hostile) == ON_CONNECT
    assert set(Alert.objects.values_list("kind", flat=True)) == ON_CONNECT | {"auth_failures"}


def test_takeover_attempt_is_a_client_id_conflict_on_the_attackers_own_id(broker, operator):
    # use_username_as_clientid: the broker replaces the id the attacker asked for (the victim's) with its own
    # username, so the attacker only kicks its own session. The conflict, and the different fingerprint of the
    # second client, are what the log shows.
    specs = fleet(operator, 3, hostile=1)
    hostile = specs[0].client_id
    result = simulate(broker, specs, attacks=("takeover",), duration=3.0)
    assert wait_until(lambda: "client_id_conflict" in kinds_for(hostile), timeout=8), kinds_for(hostile)
    assert ingested(specs, result), "the consumer never recorded the simulation's telemetry"
    assert kinds_for(hostile) - ON_CONNECT <= {"client_id_conflict", "fingerprint_changed", "credential_cloned"}
    assert "fingerprint_changed" in kinds_for(hostile) or "credential_cloned" in kinds_for(hostile)
    assert alerts_for_others(specs, hostile) == [], broker.log()


def test_cross_device_publish_is_invisible_to_detection(broker, operator):
    """Denied publishes are not in the broker log (debug level is never published) and never reach the consumer:
    the broker's refusal is the whole defence. The victim's data is untouched and no alert names the victim."""
    specs = fleet(operator, 2, hostile=1)
    hostile, victim = specs[0].client_id, specs[1].client_id
    result = simulate(broker, specs, attacks=("cross_publish",), duration=3.0)
    assert result["hostile_stats"].get("refused_cross_publish", 0) >= 1
    assert ingested(specs, result), "the consumer never recorded the simulation's telemetry"
    assert kinds_for(victim) == set()
    assert kinds_for(hostile) == ON_CONNECT


def test_cross_device_publish_is_an_acl_alert_for_the_attacker_when_the_debug_log_is_on(broker, operator):
    """DETECTION_DENIED_PUBLISHES: the broker writes its debug log (with "Denied PUBLISH from <id>") to a file the
    monitor tails; the attacker gets a publish_denied alert naming the victim's topic, the victim gets nothing."""
    from django.test.utils import override_settings

    debug_log = Path(settings.MQTT_BROKER_DIR) / "broker-debug.log"
    with override_settings(DETECTION_DENIED_PUBLISHES=True):
        specs = fleet(operator, 2, hostile=1)  # renders the config with the debug log file
        broker.restart()
    hostile, victim = specs[0].client_id, specs[1].client_id

    def logged(text):
        return debug_log.exists() and text in debug_log.read_text(errors="replace")

    # The worker's consumer and monitor reconnect to the restarted broker (their subscriptions are logged there).
    assert wait_until(lambda: logged("fleetkeeper-consumer 1 $share/"), timeout=15), broker.log()[-2000:]
    assert wait_until(lambda: logged("fleetkeeper-monitor 0 $SYS/broker/log/#"), timeout=15)
    result = simulate(broker, specs, attacks=("cross_publish",), duration=3.0)
    assert result["hostile_stats"].get("refused_cross_publish", 0) >= 1
    assert logged(f"Denied PUBLISH from {hostile}")
    assert wait_until(lambda: "publish_denied" in kinds_for(hostile), timeout=8), kinds_for(hostile)
    assert ingested(specs, result), "the consumer never recorded the simulation's telemetry"
    assert kinds_for(hostile) == ON_CONNECT | {"publish_denied"}
    assert kinds_for(victim) == set()
    alert = Alert.objects.get(client_id=hostile, kind="publish_denied")
    assert alert.device is not None and alert.device.client_id == hostile
    assert alert.severity == "high" and alert.evidence["target_client_id"] == victim
    topics_tried = {sample["topic"] for sample in alert.evidence["samples"]}
    assert topics_tried <= {f"tx/{victim}/telemetry", f"rx/{victim}/command"} and topics_tried
    # Every denied attempt updated the one alert.
    assert alert.occurrences == alert.evidence["counts"]["denied_publishes"] >= 1


def test_stale_firmware_is_flagged_from_the_status_message(broker, operator):
    specs = fleet(operator, 2, firmware="1.2.0")
    model = Device.objects.get(client_id=specs[0].client_id).model
    model.latest_firmware, model.minimum_firmware = "1.4.0", "1.3.0"
    model.save()
    other = Device.objects.get(client_id=specs[1].client_id).model
    other.latest_firmware = "1.2.0"
    other.save()
    simulate(broker, specs, duration=2.0)
    assert wait_until(lambda: kinds_for(specs[0].client_id) == {"firmware_below_minimum"})
    assert kinds_for(specs[1].client_id) == set()
    assert Device.objects.get(client_id=specs[0].client_id).firmware_version == "1.2.0"


def test_a_device_silent_past_its_interval_is_flagged_and_the_talking_one_is_not(broker, operator):
    specs = fleet(operator, 2)
    simulate(broker, specs, duration=2.0)
    assert wait_until(lambda: Device.objects.filter(last_seen__isnull=False).count() == 2)
    talking = threading.Thread(target=simulate, args=(broker, specs[:1]), kwargs={"duration": 6.0})
    talking.start()

    def silent_for():
        return (timezone.now() - Device.objects.get(client_id=specs[1].client_id).last_seen).total_seconds()

    # Silent past the worker's limit (DETECTION_SILENCE_SECONDS=3), by the clock of its own last_seen.
    assert wait_until(lambda: silent_for() > 3.5, timeout=10), silent_for()
    # The beat task, run by the real worker (DETECTION_SILENCE_SECONDS=3 there), as the schedule would send it.
    detect_silent_devices.apply_async(queue=QUEUE)
    assert wait_until(lambda: kinds_for(specs[1].client_id) == {"device_silent"}, timeout=10)
    talking.join()
    assert kinds_for(specs[1].client_id) == {"device_silent"}
    assert kinds_for(specs[0].client_id) == set()
    alert = Alert.objects.get(kind="device_silent")
    assert alert.device.client_id == specs[1].client_id and alert.evidence["silence_limit_seconds"] == 3


def _garbage(rng: random.Random, i: int) -> bytes:
    choice = i % 8
    if choice == 0:
        return rng.randbytes(rng.randint(0, 300))
    if choice == 1:
        return b"{" * rng.randint(1, 5000)
    if choice == 2:
        return b"[" * 20000 + b"]" * 20000
    if choice == 3:
        return json.dumps({"v": 1, "type": "telemetry", "id": "x", "ts": 1, "seq": -1, "values": {}}).encode()
    if choice == 4:
        return b'{"v":1,"type":"telemetry","id":"a","ts":NaN,"seq":1,"values":{}}'
    if choice == 5:
        message = {"v": 1, "type": "telemetry", "id": "a", "ts": 1, "seq": 1, "values": {"Bad Name": 1}}
        return json.dumps(message).encode()
    if choice == 6:
        return b"x" * (protocol.MAX_MESSAGE_BYTES + 10)
    return json.dumps(["not", "an", "object", i]).encode()


def test_ten_thousand_malformed_payloads_are_counted_and_the_consumer_keeps_going(broker, operator):
    specs = fleet(operator, 2)
    noisy, quiet = specs
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=noisy.client_id, protocol=mqtt.MQTTv311)
    client.username_pw_set(noisy.client_id, noisy.secret)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    rng = random.Random(3)
    try:
        for i in range(10_000):
            channel = "status" if i % 10 == 9 else "telemetry"
            client.publish(f"tx/{noisy.client_id}/{channel}", _garbage(rng, i), qos=0)
            if i % 500 == 0:
                time.sleep(0.01)
        valid = protocol.encode_telemetry(message_id="ok-1", ts=time.time(), seq=1, values={"temperature": 20.0})
        info = client.publish(f"tx/{noisy.client_id}/telemetry", valid, qos=1)
        info.wait_for_publish(5)
    finally:
        client.disconnect()
        client.loop_stop()

    def counted():
        row = DeviceActivity.objects.filter(client_id=noisy.client_id).first()
        return row is not None and row.messages == 10_001

    assert wait_until(counted, timeout=30)
    row = DeviceActivity.objects.get(client_id=noisy.client_id)
    assert row.malformed == 10_000 and row.telemetry == 1
    alert = Alert.objects.get(client_id=noisy.client_id, kind="malformed_messages")
    assert alert.evidence["counts"]["malformed"] == 10_000
    # The consumer is still running: an honest device's messages are processed afterwards.
    simulate(broker, [quiet], duration=2.0)
    assert wait_until(lambda: DeviceActivity.objects.filter(client_id=quiet.client_id, telemetry__gte=2).exists())
    assert Alert.objects.filter(kind="malformed_messages").count() == 1
