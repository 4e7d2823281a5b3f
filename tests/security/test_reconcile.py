"""The outbox, the apply task and the reconcile job against a real Mosquitto (and, where it matters, a real worker)."""

import os
import signal

import pytest
from django.conf import settings

from security import services
from security.brokers.base import BrokerUnavailable
from security.enforcement.secrets import hash_secret
from security.models import AuditEvent, BrokerState, EnforcementChange
from security.tasks import reconcile_broker
from tests.factories import DeviceFactory
from tests.support.broker import MqttClient, raw_connect_code
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.integration]


def can_connect(port, username, password):
    return raw_connect_code(port, client_id=username, username=username, password=password) == 0


@pytest.mark.django_db
def test_apply_settles_every_pending_change_in_one_reload(mosquitto, operator):
    secrets_by_id = {}
    for n in range(5):
        device = DeviceFactory(client_id=f"device-batch{n}")
        secrets_by_id[device.client_id] = services.credential_issue(actor=operator, device=device).password
    reloads_before = mosquitto.log().count("Reloading config")
    result = services.enforcement_apply(coalesce=False)
    assert result.reloaded and result.probe.ok
    assert not EnforcementChange.objects.exclude(state=EnforcementChange.State.APPLIED).exists()
    assert all(c.probe["ok"] and c.digest == result.digest for c in EnforcementChange.objects.all())
    assert wait_until(lambda: mosquitto.log().count("Reloading config") == reloads_before + 1, timeout=3)
    # A task for an already-applied change finds nothing to do (coalesced).
    first = EnforcementChange.objects.order_by("id").first()
    assert services.enforcement_apply(change_id=first.pk) is None
    for client_id, secret in secrets_by_id.items():
        assert can_connect(mosquitto.port, client_id, secret)
    state = BrokerState.load()
    assert state.reachable and state.last_probe_ok and state.applied_digest == result.digest


@pytest.mark.django_db
def test_broker_down_keeps_the_change_pending_and_reconcile_applies_it_when_back(mosquitto, operator, support):
    device = DeviceFactory(client_id="device-down")
    secret = services.credential_issue(actor=operator, device=device).password
    services.enforcement_apply(coalesce=False)
    mosquitto.stop()
    services.device_revoke(actor=support, device=device, reason="stolen while the broker was down")
    with pytest.raises(BrokerUnavailable):
        services.enforcement_apply(coalesce=False)
    change = EnforcementChange.objects.get(kind="device.revoke")
    assert (
        change.state == EnforcementChange.State.PENDING and change.attempts == 1 and "not running" in change.last_error
    )
    assert BrokerState.load().reachable is False
    mosquitto.start()
    outcome = services.broker_reconcile(trigger="test")
    assert outcome["probe"]["ok"], outcome
    change.refresh_from_db()
    assert change.state == EnforcementChange.State.APPLIED
    assert not can_connect(mosquitto.port, "device-down", secret)
    assert "restart" in outcome["drift"]


@pytest.mark.django_db
def test_reconcile_converges_after_a_broker_restart_with_stale_files(mosquitto, operator):
    device = DeviceFactory(client_id="device-stale")
    old = services.credential_issue(actor=operator, device=device).password
    services.enforcement_apply(coalesce=False)
    # The broker restarts from an old copy of its files (a restored volume): the old secret works there again.
    saved = {name: (mosquitto.dir / name).read_text() for name in ("passwd", "acl")}
    new = services.credential_issue(actor=operator, device=device).password
    services.enforcement_apply(coalesce=False)
    mosquitto.stop()
    for name, text in saved.items():
        (mosquitto.dir / name).write_text(text)
    mosquitto.start()
    assert can_connect(mosquitto.port, "device-stale", old)
    outcome = services.broker_reconcile(trigger="test")
    assert outcome["repaired"] and outcome["probe"]["ok"]
    assert set(outcome["drift"]) >= {"passwd", "restart"}
    assert not can_connect(mosquitto.port, "device-stale", old)
    assert can_connect(mosquitto.port, "device-stale", new)
    # Nothing left to repair.
    assert services.broker_drift() == {}


@pytest.mark.django_db
def test_reconcile_repairs_a_hand_edited_password_file_and_records_the_unknown_credential(mosquitto, operator):
    device = DeviceFactory(client_id="device-kept")
    secret = services.credential_issue(actor=operator, device=device).password
    services.enforcement_apply(coalesce=False)
    passwd = mosquitto.dir / "passwd"
    lines = [line for line in passwd.read_text().splitlines() if not line.startswith("device-kept:")]
    lines.append("intruder:" + hash_secret("let-me-in-please", iterations=1))
    passwd.write_text("\n".join(lines) + "\n")
    os.kill(int((mosquitto.dir / "mosquitto.pid").read_text()), signal.SIGHUP)
    assert wait_until(lambda: can_connect(mosquitto.port, "intruder", "let-me-in-please"), timeout=3)
    assert not can_connect(mosquitto.port, "device-kept", secret)

    outcome = services.broker_reconcile(trigger="test")

    assert outcome["repaired"], outcome
    assert outcome["drift"]["passwd"] == {"unknown": ["intruder"], "missing": ["device-kept"]}
    assert not can_connect(mosquitto.port, "intruder", "let-me-in-please")
    assert can_connect(mosquitto.port, "device-kept", secret)
    event = AuditEvent.objects.get(action="broker.unknown_credential")
    assert event.object_id == "intruder" and event.after["removed"] is True
    assert AuditEvent.objects.filter(action="broker.drift_repaired").exists()
    state = BrokerState.load()
    assert state.drift["passwd"]["unknown"] == ["intruder"] and state.last_probe_ok


@pytest.mark.django_db
def test_reconcile_repairs_a_hand_edited_acl(mosquitto, operator):
    device = DeviceFactory(client_id="device-acl")
    secret = services.credential_issue(actor=operator, device=device).password
    services.enforcement_apply(coalesce=False)
    acl = mosquitto.dir / "acl"
    acl.write_text(acl.read_text() + "pattern read #\n")
    os.kill(int((mosquitto.dir / "mosquitto.pid").read_text()), signal.SIGHUP)
    spy = MqttClient(mosquitto.port, client_id="device-acl", username="device-acl", password=secret)
    try:
        assert spy.connect() == 0
        spy.subscribe("#")
        console = MqttClient(
            mosquitto.port,
            client_id="c",
            username=settings.MQTT_COMMANDER_USERNAME,
            password=settings.MQTT_COMMANDER_PASSWORD,
        )
        assert console.connect() == 0
        console.publish("rx/device-other/command", b"leak")
        assert spy.wait_for(lambda msgs: any(m.payload == b"leak" for m in msgs))  # the edit took effect
        outcome = services.broker_reconcile(trigger="test")
        assert "acl" in outcome["drift"] and outcome["repaired"]
        console.publish("rx/device-other/command", b"leak-again")
        assert not spy.wait_for(lambda msgs: any(m.payload == b"leak-again" for m in msgs), timeout=0.5)
        console.close()
    finally:
        spy.close()


@pytest.mark.django_db
def test_reconcile_in_sync_changes_nothing(mosquitto, operator):
    services.enforcement_apply(coalesce=False)
    reloads = mosquitto.log().count("Reloading config")
    outcome = services.broker_reconcile(trigger="test")
    assert outcome["drift"] == {} and outcome["probe"]["ok"]
    # A reload would have been signalled before the probe ran, and the broker logs it before it serves the probe.
    assert mosquitto.log().count("Reloading config") == reloads
    assert services.enforcement_summary()["label"] == "in sync"


# --- with a real Celery worker ---------------------------------------------------------------------------


@pytest.mark.slow
def test_worker_applies_an_issued_credential_and_the_device_connects(
    transactional_db, celery_worker, mosquitto, operator
):
    device = DeviceFactory(client_id="device-worker1")
    issued = services.credential_issue(actor=operator, device=device)  # autocommit: the task is enqueued now
    change = issued.change
    assert wait_until(
        lambda: EnforcementChange.objects.get(pk=change.pk).state == EnforcementChange.State.APPLIED, timeout=20.0
    ), celery_worker.log()[-3000:]
    assert can_connect(mosquitto.port, "device-worker1", issued.password)
    assert EnforcementChange.objects.get(pk=change.pk).probe["ok"]


@pytest.mark.slow
def test_worker_keeps_a_revocation_pending_while_the_broker_is_down_and_applies_it_later(
    transactional_db, celery_worker, mosquitto, operator, support
):
    device = DeviceFactory(client_id="device-worker2")
    issued = services.credential_issue(actor=operator, device=device)
    assert wait_until(lambda: EnforcementChange.objects.get(pk=issued.change.pk).state == "applied", timeout=20.0), (
        celery_worker.log()[-3000:]
    )
    mosquitto.stop()
    services.device_revoke(actor=support, device=device, reason="stolen")
    change = EnforcementChange.objects.get(kind="device.revoke", client_id="device-worker2")
    # The task tries, fails, and retries with backoff; the row records each attempt and stays pending.
    assert wait_until(lambda: EnforcementChange.objects.get(pk=change.pk).attempts >= 1, timeout=20.0), (
        celery_worker.log()[-3000:]
    )
    change.refresh_from_db()
    assert change.state == EnforcementChange.State.PENDING and change.last_error
    mosquitto.start()
    reconcile_broker.delay(trigger="broker-start")
    assert wait_until(lambda: EnforcementChange.objects.get(pk=change.pk).state == "applied", timeout=20.0), (
        celery_worker.log()[-3000:]
    )
    assert not can_connect(mosquitto.port, "device-worker2", issued.password)


@pytest.mark.slow
def test_run_broker_triggers_a_reconcile_once_the_broker_listens(transactional_db, celery_worker, operator):
    """`make run` starts the broker with run_broker: changes made while it was down are applied and verified."""
    import subprocess
    import sys

    from django.db import connection

    from tests.support.servers import BASE_DIR, stop

    device = DeviceFactory(client_id="device-start")
    issued = services.credential_issue(actor=operator, device=device)  # no broker yet: stays pending
    assert wait_until(lambda: EnforcementChange.objects.get(pk=issued.change.pk).attempts >= 1, timeout=20.0), (
        celery_worker.log()[-3000:]
    )
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "fleet.settings_test",
        "FLEET_TEST_DB_NAME": str(connection.settings_dict["NAME"]),
    }
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "run_broker"],
        cwd=BASE_DIR,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        assert wait_until(
            lambda: EnforcementChange.objects.get(pk=issued.change.pk).state == EnforcementChange.State.APPLIED,
            timeout=30,
        ), celery_worker.log()[-3000:]
        assert can_connect(settings.MQTT_PORT, "device-start", issued.password)
        state = BrokerState.load()
        assert state.reachable and state.last_probe_ok and state.broker_pid == proc.pid
    finally:
        stop(proc)
        for child in settings.MQTT_BROKER_DIR.iterdir():
            if child.is_file():
                child.unlink()
