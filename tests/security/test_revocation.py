"""Revocation and quarantine (issue 5) end to end: the REST API, a real Celery worker, a real Mosquitto with the
rendered policy, and the verifier. Judged by what a device and the broker do, not by rows alone."""

import os
import signal
import time

import pytest
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from devices.models import Device
from security import services
from security.models import AuditEvent, DeviceAction, EnforcementChange
from security.tasks import reconcile_broker
from tests.factories import DeviceFactory
from tests.support.broker import ConsoleClients, MqttClient, raw_connect_code
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SETTLE = 0.3


def can_connect(port, username, password):
    return raw_connect_code(port, client_id=username, username=username, password=password) == 0


def api(user):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.get_or_create(user=user)[0].key}")
    return client


def action_state(record_id):
    return DeviceAction.objects.get(pk=record_id).state


@pytest.fixture
def roles_present(transactional_db):
    """A transactional test before this one flushed the tables, roles included: re-create them."""
    from django.apps import apps

    from security.roles import roles_sync

    roles_sync(apps)


@pytest.fixture
def live_device(roles_present, celery_worker, mosquitto, operator):
    """An active device with a console-issued secret, applied on the broker by the worker."""

    def make(client_id):
        device = DeviceFactory(client_id=client_id)
        issued = services.credential_issue(actor=operator, device=device)
        assert wait_until(
            lambda: EnforcementChange.objects.get(pk=issued.change.pk).state == "applied", timeout=20.0
        ), celery_worker.log()[-3000:]
        return device, issued.password

    return make


@pytest.mark.serial  # a one-second bound from the API call to the drop
def test_api_revoke_disconnects_within_a_second_refuses_reconnect_and_is_verified(
    live_device, mosquitto, support, celery_worker
):
    device, secret = live_device("device-rev1")
    session = MqttClient(mosquitto.port, client_id="device-rev1", username="device-rev1", password=secret)
    assert session.connect() == 0
    try:
        response = api(support).post(
            "/api/v1/devices/device-rev1/revoke/",
            {"reason": "stolen from the depot"},
            format="json",
            HTTP_X_REQUEST_ID="revoke-req-1",
        )
        returned = time.monotonic()
        assert response.status_code == 202, response.content
        body = response.json()
        assert body["state"] == "pending" and body["action"] == "revoke"
        assert session.wait_disconnected(timeout=1.0), "still connected a second after the API call"
        dropped_after = time.monotonic() - returned
        assert dropped_after < 1.0
        assert not can_connect(mosquitto.port, "device-rev1", secret)
        # Proven, not assumed: the verifier records the refusal against the loaded policy.
        assert wait_until(lambda: action_state(body["id"]) == "verified", timeout=10), celery_worker.log()[-3000:]
        detail = api(support).get(body["url"]).json()
        evidence = detail["evidence"]
        assert evidence["generation_loaded"] is True
        assert evidence["in_password_file"] is False
        assert evidence["connect_attempt"]["refused"] is True and evidence["connect_attempt"]["code"] != 0
        assert detail["verified_at"] and detail["outbox_state"] == "applied"
    finally:
        session.close()
    # Audited: who, when, why, from where, and the verification result.
    revoke = AuditEvent.objects.get(action="device.revoke", object_id="device-rev1")
    assert revoke.actor == support and revoke.after["reason"] == "stolen from the depot"
    assert revoke.source_address == "127.0.0.1" and revoke.request_id == "revoke-req-1"
    verified = AuditEvent.objects.get(action="device.revoke_verified", object_id="device-rev1")
    assert verified.actor_label.startswith("service:") and verified.after["connect_attempt"]["refused"] is True
    # The device page says so.
    from django.test import Client

    page = Client()
    page.force_login(support)
    html = page.get("/devices/device-rev1/").content.decode()
    assert "verified refused at" in html and "stolen from the depot" in html


def test_quarantined_device_receives_credentials_but_cannot_publish_telemetry(
    live_device, mosquitto, support, celery_worker
):
    device, secret = live_device("device-quar1")
    dev = MqttClient(mosquitto.port, client_id="device-quar1", username="device-quar1", password=secret)
    console = ConsoleClients(mosquitto.port)  # reads as the consumer, sends as the commander
    assert dev.connect() == 0 and console.connect() == 0
    try:
        dev.subscribe("rx/device-quar1/#")
        console.subscribe("tx/+/#")
        response = api(support).post(
            "/api/v1/devices/device-quar1/quarantine/", {"reason": "odd traffic"}, format="json"
        )
        assert response.status_code == 202, response.content
        record_id = response.json()["id"]
        assert wait_until(lambda: action_state(record_id) == "verified", timeout=10), celery_worker.log()[-3000:]
        assert dev.is_connected  # quarantine keeps the session: the device can still be repaired
        console.publish("rx/device-quar1/command", b"do-something")
        console.publish("rx/device-quar1/credentials", b"new-secret-envelope")
        dev.publish("tx/device-quar1/telemetry", b"telemetry-while-quarantined")
        dev.publish("tx/device-quar1/ack", b"ack-for-credentials")
        assert dev.wait_for(lambda msgs: any(m.payload == b"new-secret-envelope" for m in msgs))
        assert console.wait_for(lambda msgs: any(m.payload == b"ack-for-credentials" for m in msgs))
        dev.wait_for(lambda msgs: False, timeout=SETTLE)
        assert b"do-something" not in dev.payloads()
        assert b"telemetry-while-quarantined" not in console.payloads()
        evidence = DeviceAction.objects.get(pk=record_id).evidence
        assert "topic deny tx/device-quar1/telemetry" in evidence["acl_denies"] and evidence["repair_path_kept"]
    finally:
        dev.close()
        console.close()


def test_broker_down_during_revocation_ends_refused_and_verified_without_anyone_acting(
    live_device, mosquitto, support, celery_worker
):
    device, secret = live_device("device-down1")
    mosquitto.stop()
    response = api(support).post("/api/v1/devices/device-down1/revoke/", {"reason": "broker outage"}, format="json")
    assert response.status_code == 202
    record_id = response.json()["id"]
    change = DeviceAction.objects.get(pk=record_id).change
    # The apply task tries, fails, records the attempt and retries with backoff; the UI says pending.
    assert wait_until(lambda: EnforcementChange.objects.get(pk=change.pk).attempts >= 1, timeout=10)
    assert action_state(record_id) == "pending"
    # The broker stays down through a retry: the second failed attempt is recorded and the action is still pending.
    assert wait_until(lambda: EnforcementChange.objects.get(pk=change.pk).attempts >= 2, timeout=20), (
        celery_worker.log()[-3000:]
    )
    assert action_state(record_id) == "pending"
    mosquitto.start()
    # Nobody does anything: the task's own retry applies and the verifier proves it.
    assert wait_until(lambda: action_state(record_id) == "verified", timeout=60), celery_worker.log()[-3000:]
    assert not can_connect(mosquitto.port, "device-down1", secret)
    assert EnforcementChange.objects.get(pk=change.pk).state == "applied"


def test_worker_killed_mid_revocation_does_not_lose_it(live_device, mosquitto, support, celery_worker):
    """The worker dies while it holds the revocation (waiting to retry against a broker that is down). The outbox
    row survives; a new worker's reconcile (what beat runs every minute) applies and verifies it."""
    device, secret = live_device("device-kill1")
    assert can_connect(mosquitto.port, "device-kill1", secret)
    mosquitto.stop()
    response = api(support).post("/api/v1/devices/device-kill1/revoke/", {"reason": "compromised"}, format="json")
    record_id = response.json()["id"]
    change_id = DeviceAction.objects.get(pk=record_id).change_id
    assert wait_until(lambda: EnforcementChange.objects.get(pk=change_id).attempts >= 1, timeout=10)
    os.kill(celery_worker.proc.pid, signal.SIGKILL)
    celery_worker.proc.wait()
    assert action_state(record_id) == "pending"
    mosquitto.start()
    celery_worker._log.close()
    celery_worker.start()
    reconcile_broker.delay(trigger="schedule")
    assert wait_until(lambda: action_state(record_id) == "verified", timeout=30), celery_worker.log()[-3000:]
    assert not can_connect(mosquitto.port, "device-kill1", secret)
    assert EnforcementChange.objects.get(pk=change_id).state == "applied"


def test_api_issue_with_wait_answers_once_the_broker_takes_the_new_secret_and_drops_the_old(
    roles_present, celery_worker, mosquitto, operator
):
    """A provisioning station that connects the moment the answer arrives: with ?wait= it is never refused."""
    DeviceFactory(client_id="device-wait2")
    previous = None
    for _ in range(2):  # the first secret, then a re-issue that replaces it
        response = api(operator).post("/api/v1/devices/device-wait2/credentials/?wait=8", {}, format="json")
        assert response.status_code == 201, response.content
        issued = response.json()
        assert issued["enforced"] is True, celery_worker.log()[-3000:]
        assert EnforcementChange.objects.get(pk=issued["change"]).state == "applied"
        assert can_connect(mosquitto.port, "device-wait2", issued["password"])  # at once, no retry
        if previous:
            assert not can_connect(mosquitto.port, "device-wait2", previous["password"])
        previous = issued


def test_reinstate_restores_access_only_with_a_new_secret(live_device, mosquitto, support, operator, celery_worker):
    device, old_secret = live_device("device-back1")
    record = api(support).post("/api/v1/devices/device-back1/revoke/", {"reason": "lost"}, format="json").json()
    assert wait_until(lambda: action_state(record["id"]) == "verified", timeout=10), celery_worker.log()[-3000:]
    # Support may not reinstate; an operator may.
    assert (
        api(support).post("/api/v1/devices/device-back1/reinstate/", {"reason": "found"}, format="json").status_code
        == 403
    )
    response = api(operator).post("/api/v1/devices/device-back1/reinstate/", {"reason": "found it"}, format="json")
    assert response.status_code == 202, response.content
    assert response.json()["needs_new_secret"] is True
    assert wait_until(lambda: action_state(response.json()["id"]) == "verified", timeout=10)
    assert Device.objects.get(client_id="device-back1").status == "active"
    assert not can_connect(mosquitto.port, "device-back1", old_secret)  # the old secret never comes back
    issued = api(operator).post("/api/v1/devices/device-back1/credentials/", {}, format="json").json()
    assert wait_until(lambda: can_connect(mosquitto.port, "device-back1", issued["password"]), timeout=10)
    assert not can_connect(mosquitto.port, "device-back1", old_secret)
    actions = list(AuditEvent.objects.filter(object_id="device-back1").order_by("id").values_list("action", flat=True))
    for expected in ("device.revoke", "device.revoke_verified", "device.reinstate", "device.reinstate_verified"):
        assert expected in actions


def test_revoked_device_does_not_come_back_through_reconcile_restart_or_restored_files(
    live_device, mosquitto, support, celery_worker
):
    device, secret = live_device("device-ghost")
    old_passwd = (mosquitto.dir / "passwd").read_text()
    record = api(support).post("/api/v1/devices/device-ghost/revoke/", {"reason": "retired"}, format="json").json()
    assert wait_until(lambda: action_state(record["id"]) == "verified", timeout=10)
    # A reconcile renders from the database: the revoked device has no credential and no line.
    outcome = services.broker_reconcile(trigger="test")
    assert outcome["probe"]["ok"] and not can_connect(mosquitto.port, "device-ghost", secret)
    # A restart loads the files on disk, which no longer hold it.
    mosquitto.restart()
    assert not can_connect(mosquitto.port, "device-ghost", secret)
    # A restore of an old password file (a backup) puts the line back: the reconcile removes it and says so.
    (mosquitto.dir / "passwd").write_text(old_passwd)
    mosquitto.restart()
    outcome = services.broker_reconcile(trigger="test")
    assert outcome["repaired"] and "device-ghost" in outcome["drift"]["passwd"]["unknown"]
    assert not can_connect(mosquitto.port, "device-ghost", secret)
    assert AuditEvent.objects.filter(action="broker.unknown_credential", object_id="device-ghost").exists()


def test_auditor_may_not_revoke_and_nothing_changes(live_device, mosquitto, auditor):
    device, secret = live_device("device-aud1")
    response = api(auditor).post("/api/v1/devices/device-aud1/revoke/", {"reason": "no"}, format="json")
    assert response.status_code == 403
    assert Device.objects.get(client_id="device-aud1").status == "active"
    assert not DeviceAction.objects.exists()
    assert can_connect(mosquitto.port, "device-aud1", secret)
