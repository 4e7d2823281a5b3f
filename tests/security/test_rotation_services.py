"""Credential rotation services (issue 7) against the database, with the command publisher replaced by an in-memory
fake (the real broker path is in test_rotation.py); and the pure parts."""

import json
import re
from datetime import timedelta

import pytest
import redis
from django.conf import settings
from django.core.exceptions import PermissionDenied
from django.utils import timezone
from django_celery_beat.models import PeriodicTask

from devices.models import Device
from fleetkeeper_device import protocol
from security import services
from security.audit import audit_context
from security.enforcement.secrets import verify_secret
from security.models import (
    Alert,
    AuditEvent,
    CredentialRotation,
    DeviceAction,
    DeviceActivity,
    DeviceCertificate,
    DeviceCredential,
    EnforcementChange,
    RotationPolicy,
)
from security.rotation import commander, inbox, policies
from security.rotation import services as rotation
from tests.factories import DeviceFactory, DeviceGroupFactory, DeviceModelFactory

pytestmark = pytest.mark.django_db


class FakePublisher:
    """Stands in for the commander identity: records what would be published, acknowledges all (or none)."""

    def __init__(self, ack=True):
        self.sent: list[tuple[str, dict]] = []  # the clear (JSON) ones, decoded
        self.raw: list[tuple[str, bytes]] = []  # everything, as published
        self.ack = ack

    def __call__(self, messages, timeout=None):
        self.raw += list(messages)
        self.sent += [(topic, json.loads(payload)) for topic, payload in messages if payload[:1] == b"{"]
        return commander.Outcome([self.ack] * len(messages), {})

    def secret_for(self, client_id):
        return [m for t, m in self.sent if t == f"rx/{client_id}/credentials"][-1]["secret"]


@pytest.fixture
def publisher(monkeypatch):
    fake = FakePublisher()
    monkeypatch.setattr(commander, "_publish_locked", fake)  # the real publish seals, takes the lock
    return fake


@pytest.fixture(autouse=True)
def clean_switch_budget():
    r = redis.Redis.from_url(settings.REDIS_URL)
    for key in r.scan_iter("fleetkeeper:rotation-switches:*"):
        r.delete(key)


def with_secret(operator, client_id, **kwargs):
    device = DeviceFactory(client_id=client_id, **kwargs)
    services.credential_issue(actor=operator, device=device)
    return device


def fresh(row):
    return CredentialRotation.objects.get(pk=row.pk)


# --- pure -------------------------------------------------------------------------------------------------------


def test_kind_follows_what_the_device_authenticates_with():
    assert rotation.rotation_kind(has_credential=True, has_active_certificate=True) == "secret"
    assert rotation.rotation_kind(has_credential=False, has_active_certificate=True) == "certificate"
    assert rotation.rotation_kind(has_credential=False, has_active_certificate=False) is None


def test_command_ids_are_unique_per_delivery_and_valid_message_ids():
    ids = {rotation.command_id_for(12345678, attempt) for attempt in range(1, 200)}
    assert len(ids) == 199
    assert all(re.fullmatch(protocol.ID_PATTERN, i) for i in ids)


def test_the_credentials_message_is_what_the_device_library_accepts():
    payload = rotation.credentials_message(command_id="rot1-1-abc", secret="s" * 43, rotation_id=1, now=1000.0)
    message = protocol.decode(payload, channel="credentials")
    assert message["type"] == "credentials" and message["id"] == "rot1-1-abc" and message["secret"] == "s" * 43
    assert message["expires"] == 1000.0 + settings.ROTATION_MESSAGE_TTL_SECONDS
    assert message["credential_id"] == "rot-1"


def test_the_inbox_routes_credential_acks_csrs_and_certificate_acks_and_ignores_the_rest():
    replies = [
        ("device-1", "ack", {"id": "rot1-1-a", "command": "credentials", "status": "ok"}),
        ("device-2", "ack", {"id": "x", "command": "ping", "status": "ok"}),
        ("device-3", "csr", {"id": "c1", "csr": "..."}),
        ("device-4", "ack", {"id": "r", "command": "certificate_renew", "status": "ok"}),
        ("device-5", "ack", {"id": "rot9-2-b", "command": "credentials", "status": "rejected", "detail": "full"}),
        ("device-6", "status", {"id": "s1", "fallback": True, "refused_credential_id": "rot-4"}),
        ("device-7", "status", {"id": "s2", "credential_id": "rot-5"}),
    ]
    credential_acks, csrs, certificate_acks, fallbacks = inbox.route(replies)
    assert credential_acks == [("device-1", "rot1-1-a", "ok", ""), ("device-5", "rot9-2-b", "rejected", "full")]
    assert [c for c, _ in csrs] == ["device-3"] and [c for c, _ in certificate_acks] == ["device-4"]
    assert [c for c, _ in fallbacks] == ["device-6"]


def test_schedules_are_validated_with_messages_that_name_the_field():
    assert policies.schedule_parse(kind="interval", every=6, period="hours").label() == "every 6 hours"
    assert policies.schedule_parse(kind="crontab", crontab=" 0 3  * * * ").crontab == "0 3 * * *"
    for kwargs, field in (
        ({"kind": "interval", "every": 0, "period": "hours"}, "every"),
        ({"kind": "interval", "every": 1, "period": "minutes"}, "every"),
        ({"kind": "interval", "every": 1, "period": "weeks"}, "period"),
        ({"kind": "crontab", "crontab": "0 3 * *"}, "crontab"),
        ({"kind": "crontab", "crontab": "99 3 * * *"}, "crontab"),
    ):
        with pytest.raises(Exception) as info:
            policies.schedule_parse(**kwargs)
        assert field in info.value.message_dict


def test_the_commander_identity_may_only_write_the_device_receive_channels(db):
    from security.brokers import console_identities

    policy = services.policy_desired()
    block = policy.acl.split(f"user {settings.MQTT_COMMANDER_USERNAME}\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert block == [f"topic write rx/+/{c}" for c in ("command", "config", "credentials", "firmware")]
    assert settings.MQTT_COMMANDER_USERNAME in {i.username for i in console_identities()}
    assert f"{settings.MQTT_COMMANDER_USERNAME}:" in policy.passwd


# --- start ------------------------------------------------------------------------------------------------------


def test_start_creates_one_pending_row_audited_and_a_second_start_is_refused_or_skipped(operator):
    device = with_secret(operator, "device-rs1")
    row = rotation.rotation_start(actor=operator, device=device)
    assert row.state == "pending" and row.kind == "secret" and row.trigger == "manual"
    # The fleet default policy (and the tick that drives every rotation) exist from the first start on.
    assert row.policy.scope == "fleet" and row.deadline > timezone.now() + timedelta(hours=71)
    assert PeriodicTask.objects.filter(task="security.rotation_tick").exists()
    assert row.requested_by == operator and row.history[0]["step"] == "start"
    event = AuditEvent.objects.get(action="rotation.start", object_id="device-rs1")
    assert event.actor == operator and event.after["rotation"] == row.pk
    with pytest.raises(rotation.RotationNotPossible) as info:
        rotation.rotation_start(actor=operator, device=device)
    assert info.value.code == "in_progress" and "already has a rotation in progress" in info.value.messages[0]
    assert rotation.rotation_start(actor=operator, device=device, trigger="schedule") is None
    assert CredentialRotation.objects.filter(device=device).count() == 1


def test_devices_with_nothing_to_rotate_are_refused_with_what_to_do(operator):
    bare = DeviceFactory(client_id="device-rs-bare")
    with pytest.raises(rotation.RotationNotPossible) as info:
        rotation.rotation_start(actor=operator, device=bare)
    assert info.value.code == "not_rotatable" and "Issue a credential first" in info.value.messages[0]
    revoked = with_secret(operator, "device-rs-rev")
    with audit_context(service="test"):
        services.device_revoke(actor=None, device=revoked, reason="test")
    with pytest.raises(rotation.RotationNotPossible) as info:
        rotation.rotation_start(actor=operator, device=revoked)
    assert "revoked" in info.value.messages[0]
    assert rotation.rotation_start(actor=operator, device=revoked, trigger="campaign") is None


def test_a_certificate_only_device_gets_a_certificate_rotation(operator):
    from security.pki.services import certificate_factory_bundle

    device = DeviceFactory(client_id="device-rs-cert")
    with audit_context(service="test"):
        certificate_factory_bundle(actor=None, device=device)
    assert DeviceCertificate.objects.filter(device=device, status="active").exists()
    assert rotation.rotation_start(actor=operator, device=device).kind == "certificate"


def test_roles_without_the_rotate_permission_cannot_start(support, auditor, operator):
    device = with_secret(operator, "device-rs-role")
    for user in (support, auditor):
        with pytest.raises(PermissionDenied):
            rotation.rotation_start(actor=user, device=device)
    with pytest.raises(PermissionDenied):
        rotation.rotation_start_many(actor=support, client_ids=["device-rs-role"], trigger="manual")


def test_start_many_skips_open_revoked_unknown_and_bare_devices_and_resolves_each_devices_policy(operator):
    model = DeviceModelFactory(name="Model-R")
    group = DeviceGroupFactory(name="group-r")
    fleet = policies.rotation_defaults_ensure()
    by_model = policies.rotation_policy_create(
        actor=operator, data={"name": "model", "scope": "model", "device_model": model, "grace_hours": 5}
    )
    by_group = policies.rotation_policy_create(
        actor=operator, data={"name": "group", "scope": "group", "group": group, "grace_hours": 7}
    )
    plain = with_secret(operator, "device-rm-plain")
    modelled = with_secret(operator, "device-rm-model", model=model)
    grouped = with_secret(operator, "device-rm-group", model=model)
    grouped.groups.add(group)
    busy = with_secret(operator, "device-rm-busy")
    rotation.rotation_start(actor=operator, device=busy)
    DeviceFactory(client_id="device-rm-bare")
    ids = ["device-rm-plain", "device-rm-model", "device-rm-group", "device-rm-busy", "device-rm-bare", "nope"]
    assert rotation.rotation_start_many(actor=operator, client_ids=ids + ids, trigger="manual") == 3
    rows = {r.client_id: r for r in CredentialRotation.objects.filter(trigger="manual", state="pending")}
    assert rows["device-rm-plain"].policy == fleet
    assert rows["device-rm-model"].policy == by_model
    assert rows["device-rm-group"].policy == by_group
    assert rows["device-rm-group"].deadline < rows["device-rm-plain"].deadline
    assert CredentialRotation.objects.filter(device=busy).count() == 1
    assert AuditEvent.objects.filter(action="rotation.start").count() == 4
    assert plain.pk and modelled.pk
    assert rotation.rotation_start_many(actor=operator, client_ids=ids, trigger="manual") == 0


# --- deliver -----------------------------------------------------------------------------------------------------


def test_delivery_sends_a_fresh_secret_and_stores_only_its_hash(operator, publisher):
    device = with_secret(operator, "device-rd1")
    old_hash = DeviceCredential.objects.get(device=device).password_hash
    row = rotation.rotation_start(actor=operator, device=device)
    outcome = rotation.rotation_deliver(rotation_ids=[row.pk])
    assert outcome["published"] == 1
    row = fresh(row)
    topic, message = publisher.sent[0]
    assert topic == "rx/device-rd1/credentials" and message["id"] == row.command_id
    secret = message["secret"]
    assert len(secret) >= 43 and verify_secret(secret, row.pending_hash)
    assert row.state == "delivered" and row.attempts == 1 and row.delivered_at
    # The plaintext is nowhere at rest; the broker still has the old secret.
    dumped = json.dumps(list(CredentialRotation.objects.values()), default=str)
    dumped += json.dumps(list(AuditEvent.objects.values("before", "after")), default=str)
    assert secret not in dumped
    assert DeviceCredential.objects.get(device=device).password_hash == old_hash
    # A redelivered first-delivery task does not send again; a re-send makes a new secret and command id.
    assert rotation.rotation_deliver(rotation_ids=[row.pk])["published"] == 0
    rotation.rotation_deliver(rotation_ids=[row.pk], resend=True)
    again = fresh(row)
    assert again.attempts == 2 and again.command_id != row.command_id and again.pending_hash != row.pending_hash
    assert publisher.secret_for("device-rd1") != secret


def test_a_device_with_a_payload_key_gets_its_new_secret_sealed_to_that_key(operator, publisher):
    from fleetkeeper_device import sealing
    from security.payloads import payload_key_issue

    keyed, clear = with_secret(operator, "device-rk1"), with_secret(operator, "device-rk2")
    key = sealing.PayloadKey(payload_key_issue(actor=operator, device=keyed).key_text)
    started = rotation.rotation_start_many(actor=operator, client_ids=["device-rk1", "device-rk2"], trigger="manual")
    assert started == 2
    ids = list(CredentialRotation.objects.order_by("client_id").values_list("pk", flat=True))
    outcome = rotation.rotation_deliver(rotation_ids=ids)
    assert outcome["published"] == 2 and outcome["sealed"] == 1
    payloads = dict(publisher.raw)
    sealed = payloads["rx/device-rk1/credentials"]
    assert sealing.is_sealed(sealed) and b"secret" not in sealed
    opened = key.open(
        sealed, topic="rx/device-rk1/credentials", client_id="device-rk1", direction=sealing.CONSOLE_TO_DEVICE
    )
    message = protocol.decode(opened.plaintext, channel="credentials")
    row = CredentialRotation.objects.get(client_id="device-rk1")
    assert message["id"] == row.command_id and verify_secret(message["secret"], row.pending_hash)
    # The device without a key gets it in clear; a re-send to the keyed one uses the next counter (a fresh nonce).
    assert json.loads(payloads["rx/device-rk2/credentials"])["type"] == "credentials" and clear.pk
    rotation.rotation_deliver(rotation_ids=[row.pk], resend=True)
    again = key.open(
        publisher.raw[-1][1],
        topic="rx/device-rk1/credentials",
        client_id="device-rk1",
        direction=sealing.CONSOLE_TO_DEVICE,
    )
    assert again.counter == opened.counter + 1


def test_a_delivery_the_broker_did_not_acknowledge_stays_pending_with_the_error(operator, monkeypatch):
    monkeypatch.setattr(commander, "_publish_locked", FakePublisher(ack=False))
    row = rotation.rotation_start(actor=operator, device=with_secret(operator, "device-rd2"))
    assert rotation.rotation_deliver(rotation_ids=[row.pk])["failed"] == 1
    row = fresh(row)
    assert row.state == "pending" and row.attempts == 1 and "did not acknowledge" in row.last_error
    assert row.history[-1]["outcome"] == "failed"


def test_a_device_that_left_the_fleet_is_cancelled_instead_of_delivered(operator, publisher):
    device = with_secret(operator, "device-rd3")
    row = rotation.rotation_start(actor=operator, device=device)
    Device.objects.filter(pk=device.pk).update(status="decommissioned")
    rotation.rotation_deliver(rotation_ids=[row.pk])
    assert fresh(row).state == "cancelled" and publisher.sent == []


# --- confirm, switch ---------------------------------------------------------------------------------------------


def delivered(operator, client_id, publisher, **kwargs):
    row = rotation.rotation_start(actor=operator, device=with_secret(operator, client_id, **kwargs))
    rotation.rotation_deliver(rotation_ids=[row.pk])
    return fresh(row)


def test_an_ok_ack_confirms_and_a_stale_or_foreign_one_is_ignored(
    operator, publisher, django_capture_on_commit_callbacks
):
    row = delivered(operator, "device-rc1", publisher)
    assert rotation.rotation_confirm(client_id="device-rc1", command_id="rot1-9-unknown", status="ok") is None
    assert rotation.rotation_confirm(client_id="device-other", command_id=row.command_id, status="ok") is None
    assert fresh(row).state == "delivered"
    with django_capture_on_commit_callbacks() as callbacks:
        confirmed = rotation.rotation_confirm(client_id="device-rc1", command_id=row.command_id, status="ok")
    assert confirmed.state == "confirmed" and confirmed.confirmed_at
    assert len(callbacks) == 1  # the switch is enqueued after commit
    # A duplicate ack changes nothing.
    assert rotation.rotation_confirm(client_id="device-rc1", command_id=row.command_id, status="ok") is None


def test_a_device_that_refuses_its_new_secret_fails_the_rotation_and_raises_an_alert(operator, publisher):
    row = delivered(operator, "device-rc2", publisher)
    rotation.rotations_confirm(acks=[("device-rc2", row.command_id, "failed", "flash write error")])
    row = fresh(row)
    assert row.state == "failed" and "flash write error" in row.last_error and row.pending_hash == ""
    alert = Alert.objects.get(kind="rotation_rejected", client_id="device-rc2")
    assert alert.evidence["rotation"] == row.pk


def test_the_switch_moves_the_confirmed_hash_into_the_credential_with_one_outbox_row_per_batch(operator, publisher):
    rows = [delivered(operator, f"device-rw{i}", publisher) for i in range(3)]
    rotation.rotations_confirm(acks=[(r.client_id, r.command_id, "ok", "") for r in rows])
    hashes = {r.client_id: r.pending_hash for r in rows}
    changes_before = EnforcementChange.objects.count()
    result = rotation.rotation_switch(rotation_ids=[r.pk for r in rows])
    assert result["switched"] == 3 and result["deferred"] == []
    assert EnforcementChange.objects.count() == changes_before + 1
    change = EnforcementChange.objects.latest("pk")
    assert change.kind == "credential.rotate" and change.pk == result["change"]
    for r in rows:
        credential = DeviceCredential.objects.get(device_id=r.device_id)
        assert credential.password_hash == hashes[r.client_id]
        assert verify_secret(publisher.secret_for(r.client_id), credential.password_hash)
        r = fresh(r)
        assert r.state == "switched" and r.pending_hash == "" and r.history[-1]["change"] == change.pk
    assert AuditEvent.objects.filter(action="credential.rotate").count() == 3
    # Idempotent: a second run (a redelivered task) does nothing.
    assert rotation.rotation_switch(rotation_ids=[r.pk for r in rows])["switched"] == 0


def test_switches_are_limited_per_policy_per_minute_and_the_rest_deferred(operator, publisher):
    policy = policies.rotation_defaults_ensure()
    policy.switches_per_minute = 2
    policy.save()
    rows = [delivered(operator, f"device-rl{i}", publisher) for i in range(5)]
    rotation.rotations_confirm(acks=[(r.client_id, r.command_id, "ok", "") for r in rows])
    result = rotation.rotation_switch(rotation_ids=[r.pk for r in rows])
    assert result["switched"] == 2 and len(result["deferred"]) == 3
    assert CredentialRotation.objects.filter(state="confirmed").count() == 3
    # Within the same minute, the budget is spent for every worker.
    assert rotation.rotation_switch(rotation_ids=result["deferred"])["switched"] == 0


# --- completion, deadlines, re-sends, the tick ------------------------------------------------------------------


def switched(operator, client_id, publisher, **kwargs):
    row = delivered(operator, client_id, publisher, **kwargs)
    rotation.rotations_confirm(acks=[(client_id, row.command_id, "ok", "")])
    rotation.rotation_switch(rotation_ids=[row.pk])
    return fresh(row)


def test_a_switch_completes_when_the_device_connected_after_it_was_applied(operator, publisher):
    row = switched(operator, "device-rp1", publisher)
    DeviceActivity.objects.create(client_id="device-rp1", last_status_at=row.switched_at - timedelta(seconds=1))
    EnforcementChange.objects.filter(pk=row.history[-1]["change"]).update(state="applied", applied_at=timezone.now())
    assert rotation.rotations_complete_proven()["completed"] == 0  # the status came before the switch
    DeviceActivity.objects.filter(client_id="device-rp1").update(last_status_at=timezone.now())
    assert rotation.rotations_complete_proven()["completed"] == 1
    row = fresh(row)
    assert row.state == "completed" and row.completed_at and row.history[-1]["step"] == "complete"


def test_a_fallback_is_the_handover_before_the_switch_applies_and_an_alert_after(
    operator, publisher, django_capture_on_commit_callbacks
):
    from security.rotation.fallback import rotations_fallback_seen

    row = switched(operator, "device-rf1", publisher)
    report = {"id": "s1", "fallback": True, "refused_credential_id": f"rot-{row.pk}"}
    # Switched but not applied yet: the broker still has the old secret, the device was right to fall back.
    assert rotations_fallback_seen(reports=[("device-rf1", report)]) == {"alerted": 0, "expected": 1, "unknown": 0}
    applied_at = timezone.now()
    EnforcementChange.objects.filter(pk=row.history[-1]["change"]).update(state="applied", applied_at=applied_at)
    # Within the margin the reload and the reconnect may still be in flight.
    assert rotations_fallback_seen(reports=[("device-rf1", report)], now=applied_at)["expected"] == 1
    # A report naming another device's rotation, or no rotation at all, is never trusted.
    later = applied_at + timedelta(seconds=settings.ROTATION_FALLBACK_MARGIN_SECONDS + 1)
    assert (
        rotations_fallback_seen(reports=[("device-other", report), ("device-rf1", {"fallback": True})], now=later)[
            "unknown"
        ]
        == 2
    )
    assert not Alert.objects.filter(kind="rotation_fallback").exists()
    with django_capture_on_commit_callbacks() as callbacks:
        assert rotations_fallback_seen(reports=[("device-rf1", report)], now=later)["alerted"] == 1
    alert = Alert.objects.get(kind="rotation_fallback", client_id="device-rf1")
    assert alert.evidence["rotation"] == row.pk and alert.severity == "high"
    assert fresh(row).history[-1]["step"] == "fallback"
    assert any("reconcile_enqueue" in c.__qualname__ for c in callbacks)  # the reconcile that puts the broker back
    # Again: the same open alert is updated, not a second one.
    rotations_fallback_seen(reports=[("device-rf1", report)], now=later)
    assert Alert.objects.filter(kind="rotation_fallback", client_id="device-rf1").count() == 1


def test_a_switch_not_proven_in_time_raises_one_alert_and_can_still_complete(operator, publisher):
    row = switched(operator, "device-rp2", publisher)
    later = timezone.now() + timedelta(seconds=settings.ROTATION_PROOF_TIMEOUT_SECONDS + 5)
    assert rotation.rotations_complete_proven(now=later)["alerted"] == 1
    assert rotation.rotations_complete_proven(now=later)["alerted"] == 0
    alert = Alert.objects.get(kind="rotation_unproven", client_id="device-rp2")
    assert alert.severity == "high" and fresh(row).state == "switched"


def test_past_the_grace_keep_alert_keeps_the_old_secret_and_revoke_revokes(operator, publisher):
    keep = delivered(operator, "device-rg1", publisher)
    old_hash = DeviceCredential.objects.get(device_id=keep.device_id).password_hash
    strict_group = DeviceGroupFactory(name="strict")
    policies.rotation_policy_create(
        actor=operator, data={"name": "strict", "scope": "group", "group": strict_group, "on_unconfirmed": "revoke"}
    )
    device = with_secret(operator, "device-rg2")
    device.groups.add(strict_group)
    strict = rotation.rotation_start(actor=operator, device=device)
    rotation.rotation_deliver(rotation_ids=[strict.pk])
    later = timezone.now() + timedelta(hours=73)
    with audit_context(service="test"):
        assert rotation.rotations_expire(now=later) == {"failed": 2, "revoked": 1}
    assert fresh(keep).state == "failed" and fresh(strict).state == "failed"
    assert DeviceCredential.objects.get(device_id=keep.device_id).password_hash == old_hash
    assert Device.objects.get(pk=keep.device_id).status == "active"
    assert Device.objects.get(pk=device.pk).status == "revoked"
    assert Alert.objects.filter(kind="rotation_unconfirmed").count() == 2
    # Revoked through the one path for every status change: a pending DeviceAction the verifier will prove.
    action = DeviceAction.objects.get(client_id="device-rg2")
    assert (action.action, action.state) == ("revoke", "pending") and action.change.kind == "device.revoke"
    assert "not confirmed" in action.reason and not DeviceAction.objects.filter(client_id="device-rg1").exists()


def test_due_lists_stalled_deliveries_resends_and_unswitched_confirmations(operator, publisher):
    now = timezone.now()
    resend = timedelta(seconds=settings.ROTATION_RESEND_SECONDS)
    stalled = rotation.rotation_start(actor=operator, device=with_secret(operator, "device-rt1"))
    CredentialRotation.objects.filter(pk=stalled.pk).update(updated=now - timedelta(minutes=5))
    # Never seen (so away at delivery): still away, came back, and one that was online and simply never answered.
    still_away = delivered(operator, "device-rt2", publisher)
    came_back = delivered(operator, "device-rt3", publisher)
    assert came_back.history[-1]["device_away"] is True
    silent = delivered(operator, "device-rt4", publisher, last_seen=now)  # online when it was sent
    assert "device_away" not in silent.history[-1]
    # The third attempt, 90 s after the last delivery: the blind re-send waits 4 x ROTATION_RESEND_SECONDS.
    CredentialRotation.objects.filter(pk__in=[still_away.pk, came_back.pk, silent.pk]).update(
        delivered_at=now - resend - timedelta(seconds=60), attempts=3
    )
    Device.objects.filter(pk__in=[came_back.device_id, silent.device_id]).update(last_seen=now)
    due = rotation.rotations_due(now=now)
    assert due["deliver"] == [stalled.pk] and due["resend"] == [came_back.pk] and due["switch"] == []
    # Past the backoff, everyone unconfirmed is sent again (a lost message or a lost ack).
    later = now + 4 * resend
    assert set(rotation.rotations_due(now=later)["resend"]) == {still_away.pk, came_back.pk, silent.pk}


# --- policies and schedules ------------------------------------------------------------------------------------


def test_defaults_create_the_fleet_policy_its_schedule_and_the_tick_once():
    policy = policies.rotation_defaults_ensure()
    assert policy.scope == "fleet" and policy.enabled and policy.periodic_task.task == "security.rotation_policy_run"
    assert json.loads(policy.periodic_task.kwargs) == {"policy_id": policy.pk}
    assert PeriodicTask.objects.filter(task="security.rotation_tick", enabled=True).count() == 1
    policies.rotation_defaults_ensure()
    assert (
        RotationPolicy.objects.count() == 1
        and PeriodicTask.objects.filter(task__startswith="security.rot").count() == 2
    )


def test_policy_crud_keeps_its_periodic_task_in_step_and_is_audited(operator):
    group = DeviceGroupFactory(name="night-shift")
    schedule = policies.schedule_parse(kind="crontab", crontab="30 2 * * 1-5")
    policy = policies.rotation_policy_create(
        actor=operator, data={"name": "night", "scope": "group", "group": group, "max_age_days": 30}, schedule=schedule
    )
    task = PeriodicTask.objects.get(pk=policy.periodic_task_id)
    assert task.crontab.minute == "30" and task.crontab.day_of_week == "1-5" and task.interval is None
    policies.rotation_policy_update(
        actor=operator,
        policy=policy,
        data={"enabled": False, "max_age_days": 10},
        schedule=policies.schedule_parse(kind="interval", every=2, period="days"),
    )
    task.refresh_from_db()
    assert not task.enabled and task.interval.every == 2 and task.crontab is None
    update = AuditEvent.objects.get(action="rotation_policy.update")
    assert update.before["max_age_days"] == 30 and update.after["max_age_days"] == 10
    with pytest.raises(Exception, match="Choose the device group"):
        policies.rotation_policy_create(actor=operator, data={"name": "x", "scope": "group"})
    policies.rotation_policy_delete(actor=operator, policy=policy)
    assert not PeriodicTask.objects.filter(pk=task.pk).exists()
    with pytest.raises(Exception, match="cannot be deleted"):
        policies.rotation_policy_delete(actor=operator, policy=policies.rotation_defaults_ensure())


def test_a_policy_run_picks_only_old_credentials_it_governs_oldest_first_up_to_its_batch(operator, publisher):
    model = DeviceModelFactory(name="Model-P")
    fleet = policies.rotation_defaults_ensure()
    fleet.max_age_days, fleet.batch_size = 30, 2
    fleet.save()
    policies.rotation_policy_create(
        actor=operator, data={"name": "model-p", "scope": "model", "device_model": model, "max_age_days": 5}
    )
    now = timezone.now()
    ages = {"device-pp-new": 1, "device-pp-old": 40, "device-pp-older": 60, "device-pp-oldest": 90}
    for client_id, days in ages.items():
        device = with_secret(operator, client_id)
        DeviceCredential.objects.filter(device=device).update(issued_at=now - timedelta(days=days))
    other = with_secret(operator, "device-pp-model", model=model)  # governed by the model policy, not the fleet's
    DeviceCredential.objects.filter(device=other).update(issued_at=now - timedelta(days=400))
    with audit_context(service="test"):
        assert policies.rotation_policy_run(policy_id=fleet.pk) == 2
    started = set(CredentialRotation.objects.values_list("client_id", flat=True))
    assert started == {"device-pp-oldest", "device-pp-older"}
    assert set(CredentialRotation.objects.values_list("trigger", flat=True)) == {"schedule"}
    with audit_context(service="test"):
        assert policies.rotation_policy_run(policy_id=fleet.pk) == 1  # the next oldest; open ones are skipped
    assert "device-pp-new" not in set(CredentialRotation.objects.values_list("client_id", flat=True))
    assert "device-pp-model" not in set(CredentialRotation.objects.values_list("client_id", flat=True))


def test_the_typed_count_accepts_what_people_type_and_refuses_anything_else():
    from django.core.exceptions import ValidationError

    from security.confirmation import typed_count, typed_count_check

    assert typed_count(" 1,000 ") == 1000 and typed_count("12") == 12
    assert typed_count("") is None and typed_count("twelve") is None and typed_count("-3") is None
    typed_count_check(typed="1,000", matched=1000, can="can rotate now")
    with pytest.raises(ValidationError) as error:
        typed_count_check(typed="999", matched=1000, can="can rotate now")
    assert error.value.message_dict == {
        "confirm_count": ["These filters match 1000 devices that can rotate now; type 1000 to confirm."]
    }


def test_the_commander_seals_every_message_to_a_device_with_a_payload_key_whatever_sends_it(operator, publisher):
    """Credentials, certificate renewals and firmware offers all go out through commander.publish: a device with a key
    gets them sealed (and may refuse clear ones), others and non-device topics are sent as given."""
    from fleetkeeper_device import sealing
    from security.payloads import payload_key_issue

    keyed, _clear = with_secret(operator, "device-cs1"), with_secret(operator, "device-cs2")
    key = sealing.PayloadKey(payload_key_issue(actor=operator, device=keyed).key_text)
    offer = b'{"type": "firmware_offer"}'
    outcome = commander.publish(
        [("rx/device-cs1/firmware", offer), ("rx/device-cs2/firmware", offer), ("tx/device-cs1/telemetry", b"x")]
    )
    assert outcome.sealed == 1 and outcome.count == 3
    sent = publisher.raw
    assert sent[1] == ("rx/device-cs2/firmware", offer) and sent[2] == ("tx/device-cs1/telemetry", b"x")
    opened = key.open(
        sent[0][1], topic="rx/device-cs1/firmware", client_id="device-cs1", direction=sealing.CONSOLE_TO_DEVICE
    )
    assert opened.plaintext == offer
