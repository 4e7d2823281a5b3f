"""Credential rotation (issue 7) end to end: a real Mosquitto with the rendered policy, a real Celery worker that also
runs the MQTT consumer (acks reach the rotation inbox through it), real devices from fleetkeeper_device. Judged by
what the devices and the broker do: who connects with which secret, who is refused."""

import json
import os
import signal
import time
from pathlib import Path

import pytest
import redis
from django.conf import settings
from django.db import connection

from devices.models import Device
from fleetkeeper_device import Credential, CredentialSet, MemoryCredentialStore, protocol
from security import services, topics
from security.brokers import get_adapter
from security.enforcement.secrets import verify_secret
from security.models import Alert, AuditEvent, CredentialRotation, DeviceActivity, DeviceCredential, EnforcementChange
from security.rotation import services as rotation
from tests.factories import DeviceFactory
from tests.support.broker import MqttClient, raw_connect_code
from tests.support.servers import CeleryWorker
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

WORKER_ENV = {
    "DETECTION_CONSUMER_ENABLED": "1",
    "DETECTION_RECONNECT_MAX_SECONDS": "1",
    "DETECTION_FLUSH_SECONDS": "0.05",
    "DETECTION_DB_FLUSH_SECONDS": "0.2",
    # The fallback test restores the old password file right after the switch: no margin to wait out.
    "ROTATION_FALLBACK_MARGIN_SECONDS": "0",
}


def start_worker(db_name):
    return CeleryWorker(db_name=db_name, extra_env=WORKER_ENV).start()


@pytest.fixture(scope="module")
def rotation_worker(django_db_setup, django_db_blocker):
    """A worker running the rotation tasks, the enforcement apply and the consumer (which hands acks to the inbox)."""
    with django_db_blocker.unblock():
        db_name = str(connection.settings_dict["NAME"])
    holder = {"worker": start_worker(db_name), "db_name": db_name}
    yield holder
    holder["worker"].stop()


@pytest.fixture
def roles_present(transactional_db):
    from django.apps import apps

    from security.roles import roles_sync

    roles_sync(apps)


@pytest.fixture
def broker(roles_present, mosquitto, rotation_worker):
    worker = rotation_worker["worker"]
    assert mosquitto.wait_for_log("fleetkeeper-consumer 1 $share/", timeout=20), worker.log()[-3000:]
    yield mosquitto
    from fleet.celery import app

    app.control.purge()
    r = redis.Redis.from_url(settings.REDIS_URL)
    for key in r.scan_iter("fleetkeeper:rotation-switches:*"):
        r.delete(key)


def live(operator, client_id, worker):
    """A device row with a console-issued secret, applied on the broker by the worker."""
    row = DeviceFactory(client_id=client_id)
    issued = services.credential_issue(actor=operator, device=row)
    assert wait_until(lambda: EnforcementChange.objects.get(pk=issued.change.pk).state == "applied", timeout=30.0), (
        worker.log()[-3000:]
    )
    return row, issued.password


def accepted(client_id, secret):
    return raw_connect_code(settings.MQTT_PORT, client_id=client_id, username=client_id, password=secret) == 0


def state_of(rotation_id):
    return CredentialRotation.objects.get(pk=rotation_id).state


def telemetry_count(client_id):
    return DeviceActivity.objects.filter(client_id=client_id).values_list("telemetry", flat=True).first() or 0


def test_a_device_keeps_publishing_across_a_rotation_and_its_old_secret_is_refused_after(
    broker, operator, devices, rotation_worker
):
    worker = rotation_worker["worker"]
    row, old_secret = live(operator, "device-rot-live", worker)
    device = devices("device-rot-live", old_secret)
    assert device.wait_connected(10)
    assert device.publish_telemetry({"t": 1.0})
    assert wait_until(lambda: telemetry_count("device-rot-live") >= 1, timeout=30.0), worker.log()[-3000:]
    connects = device.stats["connects"]

    started = rotation.rotation_start(actor=operator, device=row)
    assert started.state == "pending" and started.kind == "secret"
    # Delivered, acked by the device, confirmed, switched by the worker; the reload drops the old session and the
    # device comes back with its new secret.
    assert wait_until(lambda: state_of(started.pk) == "switched", timeout=40), (
        CredentialRotation.objects.get(pk=started.pk).history,
        worker.log()[-4000:],
    )
    assert wait_until(lambda: device.stats["connects"] > connects and device.connected, timeout=20), device.stats
    stored = device.store.load()
    assert stored.current.secret != old_secret
    assert wait_until(lambda: device.store.load().previous is None, timeout=30.0)  # the broker took the new one
    assert device.stats["fallbacks"] == 0

    # Telemetry after the rotation reaches the console.
    before = telemetry_count("device-rot-live")
    assert wait_until(
        lambda: device.publish_telemetry({"t": 2.0}) and telemetry_count("device-rot-live") > before, timeout=30.0
    )

    # The reconnect is the proof: the tick completes it.
    assert wait_until(
        lambda: rotation.rotations_complete_proven()["completed"] or state_of(started.pk) == "completed", timeout=30.0
    )
    done = CredentialRotation.objects.get(pk=started.pk)
    assert done.state == "completed" and done.pending_hash == "" and done.attempts == 1
    assert [h["step"] for h in done.history] == ["start", "deliver", "confirm", "switch", "complete"]
    assert done.delivered_at <= done.confirmed_at <= done.switched_at <= done.completed_at

    # The broker refuses the old secret now (after the device's live session is closed, to not fight it).
    device.stop()
    assert not accepted("device-rot-live", old_secret)
    assert accepted("device-rot-live", stored.current.secret)
    # Stored at rest as a hash only, and the new issue time is recorded.
    credential = DeviceCredential.objects.get(device=row)
    assert credential.password_hash.startswith("$7$") and stored.current.secret not in credential.password_hash
    assert credential.issued_at >= done.switched_at
    actions = set(AuditEvent.objects.filter(object_id="device-rot-live").values_list("action", flat=True))
    assert {"rotation.start", "rotation.confirm", "credential.rotate", "rotation.complete"} <= actions


def test_a_device_with_a_payload_key_gets_its_new_secret_sealed_and_completes_the_handover(
    broker, operator, devices, rotation_worker
):
    """Handover step 1 "encrypted to the device's payload key": the credentials message is sealed to the device's key
    (the device library opens it; a clear one would be refused with refuse_clear_messages), the device's sealed ack
    is opened by the consumer, and the device ends on its new secret."""
    from security.payloads import payload_key_issue

    worker = rotation_worker["worker"]
    row, old_secret = live(operator, "device-rot-sealed", worker)
    key_text = payload_key_issue(actor=operator, device=row).key_text
    device = devices("device-rot-sealed", old_secret, payload_key=key_text, refuse_clear_messages=True)
    assert device.wait_connected(10)
    started = rotation.rotation_start(actor=operator, device=row)
    assert wait_until(lambda: state_of(started.pk) in ("switched", "completed"), timeout=40), (
        CredentialRotation.objects.get(pk=started.pk).history,
        device.stats,
        worker.log()[-3000:],
    )
    assert wait_until(lambda: device.connected and device.store.load().previous is None, timeout=20), device.stats
    assert device.store.load().current.secret != old_secret and device.stats["rotations"] == 1
    device.stop()
    assert not accepted("device-rot-sealed", old_secret)
    assert accepted("device-rot-sealed", device.store.load().current.secret)


def test_an_offline_device_rotates_when_it_comes_back(broker, operator, devices, rotation_worker, settings):
    settings.ROTATION_RESEND_SECONDS = 1  # the tick runs here, in the test process
    worker = rotation_worker["worker"]
    row, old_secret = live(operator, "device-rot-off", worker)
    started = rotation.rotation_start(actor=operator, device=row)
    # Published to the broker while nobody listens: delivered, not confirmed.
    assert wait_until(lambda: state_of(started.pk) == "delivered", timeout=30.0), worker.log()[-3000:]
    assert CredentialRotation.objects.get(pk=started.pk).history[-1]["device_away"] is True
    assert accepted("device-rot-off", old_secret)  # the old secret still works meanwhile

    device = devices("device-rot-off", old_secret)
    assert device.wait_connected(10)
    assert device.publish_telemetry({"t": 1.0})
    # Seen after the delivery: the tick re-sends a fresh secret, the device confirms, the broker switches.
    assert wait_until(
        lambda: rotation.rotation_tick() and state_of(started.pk) in ("switched", "completed"), timeout=40
    ), (CredentialRotation.objects.get(pk=started.pk).history, worker.log()[-4000:])
    done = CredentialRotation.objects.get(pk=started.pk)
    assert done.attempts == 2
    assert wait_until(lambda: device.connected and device.store.load().previous is None, timeout=20), device.stats
    assert wait_until(
        lambda: rotation.rotations_complete_proven() and state_of(started.pk) == "completed", timeout=30.0
    )
    new_secret = device.store.load().current.secret
    device.stop()
    assert not accepted("device-rot-off", old_secret)
    assert accepted("device-rot-off", new_secret)


def test_a_device_that_never_confirms_keeps_its_old_secret_and_raises_an_alert_after_the_grace(
    broker, operator, rotation_worker
):
    worker = rotation_worker["worker"]
    row, old_secret = live(operator, "device-rot-silent", worker)
    started = rotation.rotation_start(actor=operator, device=row)
    assert wait_until(lambda: state_of(started.pk) == "delivered", timeout=30.0), worker.log()[-3000:]
    # The grace ends (moved forward instead of waiting 72 hours).
    CredentialRotation.objects.filter(pk=started.pk).update(deadline=started.created)
    outcome = rotation.rotation_tick()
    assert outcome["expired"] == {"failed": 1, "revoked": 0}
    failed = CredentialRotation.objects.get(pk=started.pk)
    assert failed.state == "failed" and failed.pending_hash == "" and failed.failed_at
    alert = Alert.objects.get(kind="rotation_unconfirmed", client_id="device-rot-silent")
    assert alert.evidence["rotation"] == started.pk and "keeps the old one" in alert.summary
    # Nothing was switched: the broker still accepts the old secret, and the device is still active.
    assert accepted("device-rot-silent", old_secret)
    assert Device.objects.get(pk=row.pk).status == "active"
    # A new rotation can start for it (the failed one is closed).
    again = rotation.rotation_start(actor=operator, device=row)
    assert again is not None and again.pk != started.pk


def test_a_device_back_on_its_previous_secret_after_the_switch_raises_an_alert_and_the_broker_is_put_back(
    broker, operator, devices, rotation_worker
):
    """Handover step 4: the device's new secret is refused after the switch and it falls back to the old one. Made to
    happen the way it does in the field: the broker's password file is restored from a backup taken before the switch
    (the broker accepts the removed secret again) while the device is offline. The device reports its fallback in its
    status, the console alerts and reconciles, and the device ends on its new secret."""
    worker = rotation_worker["worker"]
    row, old_secret = live(operator, "device-rot-fall", worker)
    passwd = get_adapter().paths["passwd"]
    backup = passwd.read_bytes()  # the operator's backup, with the old secret's line
    # The device's side of steps 1-2, by hand, then it goes offline: it reads its new secret and confirms it.
    device_side = MqttClient(settings.MQTT_PORT, client_id=row.client_id, username=row.client_id, password=old_secret)
    try:
        assert device_side.connect() == 0
        device_side.subscribe(f"rx/{row.client_id}/#")
        started = rotation.rotation_start(actor=operator, device=row)
        assert device_side.wait_for(lambda messages: messages, timeout=20), worker.log()[-3000:]
        message = protocol.decode(device_side.messages[0].payload, channel=topics.RX_CREDENTIALS)
        ack = protocol.encode("ack", id=message["id"], ts=time.time(), command="credentials", status="ok")
        device_side.publish(f"tx/{row.client_id}/ack", ack)
        # Step 3: confirmed by the consumer, switched and applied by the worker (the reload drops this session).
        assert wait_until(lambda: state_of(started.pk) == "switched", timeout=30), worker.log()[-3000:]
        change = rotation._switch_change_id(CredentialRotation.objects.get(pk=started.pk).history)
        assert wait_until(lambda: EnforcementChange.objects.get(pk=change).state == "applied", timeout=20)
    finally:
        device_side.close()
    assert accepted(row.client_id, message["secret"]) and not accepted(row.client_id, old_secret)
    # The backup goes back in and the broker reloads it: the broker now takes the removed secret again.
    passwd.write_bytes(backup)
    get_adapter().reload()
    assert wait_until(lambda: accepted(row.client_id, old_secret), timeout=5)

    # The device comes back with both secrets, the way the device library keeps them during a handover.
    store = MemoryCredentialStore(
        CredentialSet(
            current=Credential(secret=message["secret"], credential_id=message["credential_id"]),
            previous=Credential(secret=old_secret),
        )
    )
    device = devices(row.client_id, None, credentials=store)
    # New secret refused, previous accepted: the status says so, the console alerts on this rotation.
    assert wait_until(lambda: Alert.objects.filter(kind="rotation_fallback", client_id=row.client_id).exists(), 30), (
        device.stats,
        worker.log()[-3000:],
    )
    assert device.stats["fallbacks"] >= 1
    alert = Alert.objects.get(kind="rotation_fallback", client_id=row.client_id)
    assert alert.evidence["rotation"] == started.pk and alert.evidence["refused_credential_id"] == f"rot-{started.pk}"
    assert "fallback" in [h["step"] for h in CredentialRotation.objects.get(pk=started.pk).history]
    # The reconcile it asked for puts the console's policy back: the old secret is refused again and the device,
    # dropped by that reload, comes back with its new secret and forgets the old one.
    assert wait_until(lambda: device.connected and device.store.load().previous is None, timeout=40), (
        device.stats,
        worker.log()[-3000:],
    )
    device.stop()
    assert not accepted(row.client_id, old_secret)
    assert accepted(row.client_id, message["secret"])


def test_killing_the_worker_mid_batch_and_restarting_it_completes_the_batch_with_no_device_rotated_twice(
    broker, operator, rotation_worker, devices, settings
):
    # The tick runs here: it resumes what the dead worker left after 3 s, and re-sends to devices whose ack the dead
    # worker's consumer never read after 3 s.
    settings.ROTATION_STALLED_SECONDS = settings.ROTATION_RESEND_SECONDS = 3
    worker = rotation_worker["worker"]
    n = 30
    rows, secrets_by_id = [], {}
    for i in range(n):
        row = DeviceFactory(client_id=f"device-rot-b{i:03d}")
        secrets_by_id[row.client_id] = services.credential_issue(actor=operator, device=row).password
        rows.append(row)
    last = EnforcementChange.objects.order_by("-pk").first()
    assert wait_until(lambda: EnforcementChange.objects.get(pk=last.pk).state == "applied", timeout=30.0), worker.log()[
        -3000:
    ]
    fleet = [devices(cid, secret) for cid, secret in secrets_by_id.items()]
    assert wait_until(lambda: all(d.connected for d in fleet), timeout=30)
    # Slow the switches down so the kill lands mid-batch: 10 per minute for this policy.
    from security.rotation.policies import rotation_defaults_ensure

    policy = rotation_defaults_ensure()
    policy.switches_per_minute = 10
    policy.save()
    started = rotation.rotation_start_many(
        actor=operator, client_ids=[r.client_id for r in rows], trigger="manual", policy=policy
    )
    assert started == n
    ids = list(CredentialRotation.objects.filter(client_id__startswith="device-rot-b").values_list("pk", flat=True))
    assert wait_until(lambda: CredentialRotation.objects.filter(pk__in=ids, state="switched").count() >= 1, timeout=40)
    # Kill -9 while the rest is deferred or in flight.
    os.kill(worker.proc.pid, signal.SIGKILL)
    worker.proc.wait(10)
    switched_before = CredentialRotation.objects.filter(pk__in=ids, state="switched").count()
    assert switched_before < n
    # A second start while it is down changes nothing: one open rotation per device.
    assert rotation.rotation_start_many(actor=operator, client_ids=[r.client_id for r in rows], trigger="manual") == 0
    policy.switches_per_minute = 6000
    policy.save()
    rotation_worker["worker"] = worker = start_worker(rotation_worker["db_name"])
    # The tick resumes what stalled: deliveries, switches, and a switch whose broker reload never happened.
    assert wait_until(
        lambda: (
            rotation.rotation_tick()
            and CredentialRotation.objects.filter(pk__in=ids, state__in=["switched", "completed"]).count() == n
        ),
        timeout=90,
        interval=1.0,
    ), (list(CredentialRotation.objects.filter(pk__in=ids).values_list("state", "attempts")), worker.log()[-4000:])
    # Every device holds exactly one new secret the broker accepts; no device got a second rotation.
    assert CredentialRotation.objects.filter(client_id__startswith="device-rot-b").count() == n
    back = wait_until(
        lambda: rotation.rotation_tick() and all(d.connected and d.store.load().previous is None for d in fleet),
        timeout=60,
        interval=1.0,
    )
    if not back:  # in full (pytest shortens assertion messages): each missing device's story, and the broker's
        story = json.dumps(
            [
                {
                    "device": d.client_id,
                    "broker running": broker.running,
                    "connected": d.connected,
                    "stats": dict(d.stats),
                    "broker accepts its current secret": broker.running
                    and accepted(d.client_id, d.store.load().current.secret),
                    "broker accepts its first secret": broker.running
                    and accepted(d.client_id, secrets_by_id[d.client_id]),
                    "database hash matches its current secret": verify_secret(
                        d.store.load().current.secret,
                        DeviceCredential.objects.get(device__client_id=d.client_id).password_hash,
                    ),
                    "password file line": next(
                        (
                            line
                            for line in get_adapter().paths["passwd"].read_text().splitlines()
                            if line.startswith(f"{d.client_id}:")
                        ),
                        None,
                    ),
                    "database hash": DeviceCredential.objects.get(device__client_id=d.client_id).password_hash,
                    "broker log": [line for line in broker.log().splitlines() if d.client_id in line][-20:],
                    "rotations": list(
                        CredentialRotation.objects.filter(client_id=d.client_id).values("state", "history")
                    ),
                }
                for d in fleet
                if not (d.connected and d.store.load().previous is None)
            ],
            default=str,
            indent=1,
        )
        print(story)
        artifacts = Path(__file__).resolve().parents[1] / "artifacts"
        artifacts.mkdir(exist_ok=True)
        (artifacts / "rotation-worker-kill-story.json").write_text(story)
    assert back, "some devices are not back on the broker with their new secret (their story is in the stdout)"
    for d in fleet:
        d.stop()
    for d in fleet[:5]:
        assert not accepted(d.client_id, secrets_by_id[d.client_id])
        assert accepted(d.client_id, d.store.load().current.secret)


def test_two_workers_publishing_at_once_take_turns_on_the_one_commander_session(mosquitto):
    """use_username_as_clientid: a second connection with the commander's username would take the first over. The
    Redis lock makes concurrent publishers take turns, so every message of both is acknowledged and delivered."""
    import threading

    from security.rotation import commander

    outcomes = {}

    def publish(name):
        messages = [(f"rx/device-cmd-{name}-{i}/command", b"{}") for i in range(300)]
        outcomes[name] = commander.publish(messages)

    threads = [threading.Thread(target=publish, args=(n,)) for n in ("a", "b", "c")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert {n: o.count for n, o in outcomes.items()} == {"a": 300, "b": 300, "c": 300}
    assert f"Client {settings.MQTT_COMMANDER_USERNAME} already connected" not in mosquitto.log()


def test_the_commander_writes_device_channels_only_and_reads_nothing(mosquitto, operator):
    from security.rotation import commander
    from tests.support.broker import MqttClient

    row = DeviceFactory(client_id="device-cmd-acl")
    secret = services.credential_issue(actor=operator, device=row).password
    services.enforcement_apply(coalesce=False)
    device = MqttClient(settings.MQTT_PORT, client_id="device-cmd-acl", username="device-cmd-acl", password=secret)
    spy = MqttClient(
        settings.MQTT_PORT,
        client_id=settings.MQTT_COMMANDER_USERNAME,
        username=settings.MQTT_COMMANDER_USERNAME,
        password=settings.MQTT_COMMANDER_PASSWORD,
    )
    assert device.connect() == 0
    try:
        device.subscribe("rx/device-cmd-acl/#")
        assert commander.publish([("rx/device-cmd-acl/credentials", b"through")]).count == 1
        assert device.wait_for(lambda ms: any(m.payload == b"through" for m in ms), timeout=5)
        # Denied (PUBACK 0x87 under MQTT 5), so it shows as not acknowledged: a topic outside rx/+/<channel>.
        denied = commander.publish([("tx/device-cmd-acl/telemetry", b"forged")], timeout=3)
        assert denied.count == 0 and denied.errors
        # It reads nothing, even its targets' channels.
        assert spy.connect() == 0
        spy.subscribe("rx/#", "tx/#")
        device.publish("tx/device-cmd-acl/telemetry", b"private")
        assert not spy.wait_for(lambda ms: len(ms) > 0, timeout=1.0)
    finally:
        spy.close()
        device.close()
