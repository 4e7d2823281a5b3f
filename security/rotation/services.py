"""The device-confirmed secret handover (issue 7, docs/rotation.md): start, deliver, confirm, switch, complete.

Every step is a durable CredentialRotation row with attempts, times and a history. At most one open rotation per
device (a database constraint), so a retried task or a second start never rotates a device twice. The plaintext of a
new secret exists only in the outgoing message: the row keeps Mosquitto's hash (``pending_hash``) until the switch
moves it into the device's DeviceCredential. A re-send makes a fresh secret and a new command id.

Written for batches (10,000 devices): starts are bulk inserts, deliveries publish a chunk per connection, acks of a
consumer batch are confirmed in one transaction, and one switch batch is one outbox row (one broker reload).
"""

from __future__ import annotations

import json
import logging
import secrets
from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime, timedelta

import redis
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, connection, models, transaction
from django.db.models import Exists, F, Func, OuterRef, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from devices.models import Device
from fleetkeeper_device import protocol
from security import topics
from security.audit import audit_context, audit_record, current_context
from security.brokers.render import hash_secret
from security.models import (
    AuditEvent,
    CredentialRotation,
    DeviceActivity,
    DeviceCertificate,
    DeviceCredential,
    EnforcementChange,
    RotationPolicy,
)
from security.services import SECRET_BYTES, _authorise, enforcement_enqueue

from . import commander

log = logging.getLogger(__name__)

State = CredentialRotation.State
OPEN_STATES = CredentialRotation.OPEN_STATES
ROTATABLE_STATUSES = (Device.Status.ACTIVE, Device.Status.QUARANTINED)
CHUNK = 500  # rows per IN (...) query / bulk statement
SWITCH_BUDGET_KEY = "fleetkeeper:rotation-switches"
MAX_HISTORY = 50  # steps kept per rotation (re-sends of a device offline for weeks would grow it without end)


class RotationNotPossible(ValidationError):
    """A single-device rotation was asked for and cannot start; the message says why and what to do."""


# --- small pure helpers ----------------------------------------------------------------------------------------


def rotation_kind(*, has_credential: bool, has_active_certificate: bool) -> str | None:
    """secret when the device has a broker secret; certificate when it authenticates with a certificate only;
    None when it has nothing to rotate."""
    if has_credential:
        return CredentialRotation.Kind.SECRET
    if has_active_certificate:
        return CredentialRotation.Kind.CERTIFICATE
    return None


def _step(step: str, outcome: str = "ok", detail: str = "", at: datetime | None = None, **extra) -> dict:
    entry = {"at": (at or timezone.now()).isoformat(), "step": step, "outcome": outcome}
    if detail:
        entry["detail"] = detail[:500]
    entry.update(extra)
    return entry


def _append(history: list, entry: dict) -> list:
    history = list(history or []) + [entry]
    return history if len(history) <= MAX_HISTORY else history[:1] + history[-(MAX_HISTORY - 1) :]


class HistoryAppend(Func):
    """``history`` with one more step, computed by the database: one UPDATE appends the same step to every row of a
    batch (a bulk_update of a JSON column row by row costs ~3 ms a row on SQLite; this costs ~nothing)."""

    output_field = models.JSONField()

    def __init__(self, entry: dict):
        super().__init__(F("history"), Value(json.dumps(entry, default=str)))

    def as_sql(self, compiler, connection, **extra):
        column, params = compiler.compile(self.source_expressions[0])
        entry = self.source_expressions[1].value
        if connection.vendor == "postgresql":
            return f"(COALESCE({column}, '[]'::jsonb) || jsonb_build_array(%s::jsonb))", [*params, entry]
        if connection.vendor == "sqlite":
            return f"json_insert(COALESCE({column}, '[]'), '$[#]', json(%s))", [*params, entry]
        raise NotImplementedError(f"appending to a JSON array is not written for {connection.vendor}")


def _bulk_step(ids: list[int], entry: dict, *, guard: dict | None = None, **fields) -> int:
    """Move many rows at once: set ``fields`` and append ``entry`` to their history, only where ``guard`` (e.g. the
    state they are expected in) still holds. Returns how many rows moved."""
    moved = 0
    for chunk in _chunks(ids, CHUNK):
        moved += (
            CredentialRotation.objects.filter(pk__in=chunk, **(guard or {}))
            .order_by()
            .update(history=HistoryAppend(entry), updated=timezone.now(), **fields)
        )
    return moved


def _update_per_row(model, columns: list[str], rows: list[tuple], *, key: str = "id") -> None:
    """Different values per row (a new hash, a new command id) in one executemany: Django's bulk_update builds a
    CASE per column and row, which is quadratic in practice; this is one prepared statement run many times."""
    if not rows:
        return
    quote = connection.ops.quote_name
    sets = ", ".join(f"{quote(model._meta.get_field(c).column)} = %s" for c in columns)
    # Identifiers from the model's own metadata, quoted; every value is a parameter.
    sql = f"UPDATE {quote(model._meta.db_table)} SET {sets} WHERE {quote(key)} = %s"  # noqa: S608
    with connection.cursor() as cursor:
        cursor.executemany(sql, rows)


def _placeholder_command_id() -> str:
    """Until the first delivery: unique, never sent to anyone."""
    return f"new-{secrets.token_hex(12)}"


def command_id_for(rotation_id: int, attempt: int) -> str:
    """Unique per delivery (a stale ack of an earlier delivery never confirms a later secret)."""
    return f"rot{rotation_id}-{attempt}-{secrets.token_hex(6)}"


def _actor_label(actor) -> str:
    if getattr(actor, "is_authenticated", False):
        return actor.get_username()
    context = current_context()
    return f"service:{context.service}" if context.service else "system"


def _audit_many(*, actor, action: str, items: Iterable[tuple[str, dict]]) -> int:
    """One audit event per device, written in bulk (a batch of 10,000 is 10,000 events, not 10,000 round trips).
    The same fields audit_record fills, from the same context."""
    context = current_context()
    user = actor if getattr(actor, "is_authenticated", False) else None
    label = _actor_label(actor)[:150]
    events = [
        AuditEvent(
            actor=user,
            actor_label=label,
            action=action,
            object_type="device",
            object_id=client_id[:128],
            after=after,
            source_address=context.source_address,
            request_id=context.request_id,
        )
        for client_id, after in items
    ]
    AuditEvent.objects.bulk_create(events, batch_size=CHUNK)
    return len(events)


def _chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _enqueue(task, ids: list[int], *, countdown: float | None = None) -> None:
    """After commit; a Redis outage leaves the rows durable for the tick to pick up."""

    def send():
        try:
            if countdown:
                task.apply_async(args=[ids], countdown=countdown)
            else:
                task.delay(ids)
        except Exception:
            log.exception("could not enqueue %s for %d rotations; the rotation tick resumes them", task.name, len(ids))

    transaction.on_commit(send)


def _defaults_ensure(actor) -> None:
    """The fleet default policy and the rotation tick must exist before a rotation starts: without the tick nothing
    completes, re-sends or expires. Two cheap queries; created at most once (also after migrate, see policies)."""
    from django_celery_beat.models import PeriodicTask

    from .policies import TICK_TASK, rotation_defaults_ensure

    fleet = RotationPolicy.objects.filter(scope=RotationPolicy.Scope.FLEET, periodic_task__isnull=False).exists()
    if not fleet or not PeriodicTask.objects.filter(task=TICK_TASK).exists():
        rotation_defaults_ensure(actor=actor)


# --- policy resolution -------------------------------------------------------------------------------------------


def policies_for_devices(device_rows: list[dict]) -> dict[int, RotationPolicy | None]:
    """device id -> the governing policy: a group policy beats a model policy beats the fleet default. A device in
    several groups with policies takes the oldest group policy (lowest id), so the choice is stable.
    ``device_rows`` are dicts with ``id`` and ``model_id``. Three queries whatever the number of devices."""
    policies = list(RotationPolicy.objects.all())
    fleet = next((p for p in policies if p.scope == RotationPolicy.Scope.FLEET), None)
    by_model = {p.device_model_id: p for p in policies if p.scope == RotationPolicy.Scope.MODEL}
    by_group = {p.group_id: p for p in policies if p.scope == RotationPolicy.Scope.GROUP}
    group_of: dict[int, RotationPolicy] = {}
    if by_group:
        through = Device.groups.through
        ids = [row["id"] for row in device_rows]
        for chunk in _chunks(ids, CHUNK):
            for device_id, group_id in (
                through.objects.filter(device_id__in=chunk, devicegroup_id__in=list(by_group))
                .order_by()
                .values_list("device_id", "devicegroup_id")
            ):
                policy = by_group[group_id]
                if device_id not in group_of or policy.pk < group_of[device_id].pk:
                    group_of[device_id] = policy
    return {row["id"]: group_of.get(row["id"]) or by_model.get(row["model_id"]) or fleet for row in device_rows}


def policy_for_device(device: Device) -> RotationPolicy | None:
    return policies_for_devices([{"id": device.pk, "model_id": device.model_id}])[device.pk]


def _deadline(policy: RotationPolicy | None, now: datetime) -> datetime:
    hours = policy.grace_hours if policy is not None else RotationPolicy._meta.get_field("grace_hours").default
    return now + timedelta(hours=hours)


# --- start ---------------------------------------------------------------------------------------------------------


def _new_rotation(
    *, device_id: int, client_id: str, kind: str, trigger: str, policy, campaign, wave, actor, now: datetime
) -> CredentialRotation:
    label = _actor_label(actor)
    return CredentialRotation(
        device_id=device_id,
        client_id=client_id,
        kind=kind,
        trigger=trigger,
        state=State.PENDING,
        command_id=_placeholder_command_id(),
        policy=policy,
        campaign=campaign,
        wave=wave,
        requested_by=actor if getattr(actor, "is_authenticated", False) else None,
        requested_by_label=label[:150],
        deadline=_deadline(policy, now),
        history=[_step("start", detail=f"{trigger}, by {label}", at=now)],
    )


def _cannot_rotate_reason(device: Device, *, kind: str | None) -> str:
    if device.status not in ROTATABLE_STATUSES:
        return (
            f"{device.client_id} is {device.get_status_display().lower()}: it has no credential to rotate. "
            "Reinstate it and issue a credential first."
        )
    if kind is None:
        return (
            f"{device.client_id} has no broker secret and no active certificate, so there is nothing to rotate. "
            "Issue a credential first."
        )
    return ""


def rotation_start(
    *,
    actor,
    device: Device,
    trigger: str = "manual",
    policy: RotationPolicy | None = None,
    campaign=None,
    wave=None,
) -> CredentialRotation | None:
    """Start one device's rotation; delivery is enqueued after commit.

    Returns None when the device already has an open rotation or cannot rotate. For a manual rotation (a person
    asked for this device) that is an error instead: a RotationNotPossible (ValidationError) saying why."""
    _authorise(actor, "devices.rotate_credentials")
    _defaults_ensure(actor)
    manual = trigger == CredentialRotation.Trigger.MANUAL
    with transaction.atomic():
        device = Device.objects.select_for_update().get(pk=device.pk)
        has_credential = DeviceCredential.objects.filter(device=device).exists()
        has_certificate = DeviceCertificate.objects.filter(device=device, status="active").exists()
        kind = rotation_kind(has_credential=has_credential, has_active_certificate=has_certificate)
        reason = _cannot_rotate_reason(device, kind=kind)
        in_progress = False
        if not reason:
            current = CredentialRotation.objects.filter(device=device, state__in=OPEN_STATES).first()
            if current is not None:
                in_progress = True
                reason = (
                    f"{device.client_id} already has a rotation in progress (#{current.pk}, "
                    f"{current.get_state_display().lower()}); wait for it to finish, or cancel it on the device page."
                )
        if reason:
            if manual:
                raise RotationNotPossible(reason, code="in_progress" if in_progress else "not_rotatable")
            return None
        policy = policy or policy_for_device(device)
        now = timezone.now()
        try:
            with transaction.atomic():
                rotation = _new_rotation(
                    device_id=device.pk,
                    client_id=device.client_id,
                    kind=kind,
                    trigger=trigger,
                    policy=policy,
                    campaign=campaign,
                    wave=wave,
                    actor=actor,
                    now=now,
                )
                rotation.save(force_insert=True)
        except IntegrityError:  # a concurrent start won the one-open-rotation constraint
            if manual:
                raise RotationNotPossible(
                    f"{device.client_id} already has a rotation in progress; wait for it to finish.",
                    code="in_progress",
                ) from None
            return None
        audit_record(
            actor=actor,
            action="rotation.start",
            target=device,
            after={
                "rotation": rotation.pk,
                "kind": kind,
                "trigger": trigger,
                "policy": policy.name if policy else None,
                "campaign": getattr(campaign, "pk", None),
                "deadline": rotation.deadline,
            },
        )
        from .tasks import rotation_deliver

        _enqueue(rotation_deliver, [rotation.pk])
    return rotation


def rotation_start_many(
    *, actor, client_ids: list[str], trigger: str, policy: RotationPolicy | None = None, campaign=None, wave=None
) -> int:
    """Start rotations for many devices at once; returns how many were started. Devices that already have an open
    rotation, or cannot rotate (revoked, decommissioned, nothing to rotate, unknown id), are skipped silently.
    Bulk inserts in chunks; the deliveries are enqueued after commit in chunks of ROTATION_DELIVER_CHUNK ids."""
    _authorise(actor, "devices.rotate_credentials")
    wanted = list(dict.fromkeys(client_ids))
    if not wanted:
        return 0
    _defaults_ensure(actor)
    now = timezone.now()
    created_ids: list[int] = []
    audit_items: list[tuple[str, dict]] = []
    with transaction.atomic():
        for chunk in _chunks(wanted, CHUNK):
            rows = list(
                Device.objects.filter(client_id__in=chunk, status__in=ROTATABLE_STATUSES)
                .annotate(
                    has_credential=Exists(DeviceCredential.objects.filter(device=OuterRef("pk"))),
                    has_certificate=Exists(DeviceCertificate.objects.filter(device=OuterRef("pk"), status="active")),
                    has_open=Exists(CredentialRotation.objects.filter(device=OuterRef("pk"), state__in=OPEN_STATES)),
                )
                .order_by()
                .values("id", "client_id", "model_id", "has_credential", "has_certificate", "has_open")
            )
            rows = [r for r in rows if not r["has_open"]]
            governing = {} if policy is not None else policies_for_devices(rows)
            new = []
            for r in rows:
                kind = rotation_kind(has_credential=r["has_credential"], has_active_certificate=r["has_certificate"])
                if kind is None:
                    continue
                governed_by = policy or governing.get(r["id"])
                new.append(
                    _new_rotation(
                        device_id=r["id"],
                        client_id=r["client_id"],
                        kind=kind,
                        trigger=trigger,
                        policy=governed_by,
                        campaign=campaign,
                        wave=wave,
                        actor=actor,
                        now=now,
                    )
                )
            if not new:
                continue
            # ignore_conflicts: a device that got an open rotation since the read above (a concurrent start) is
            # skipped by the database constraint instead of failing the whole batch.
            CredentialRotation.objects.bulk_create(new, batch_size=CHUNK, ignore_conflicts=True)
            placeholders = [r.command_id for r in new]
            inserted = dict(
                CredentialRotation.objects.filter(command_id__in=placeholders).values_list("command_id", "id")
            )
            for r in new:
                if r.command_id in inserted:
                    created_ids.append(inserted[r.command_id])
                    audit_items.append(
                        (
                            r.client_id,
                            {
                                "rotation": inserted[r.command_id],
                                "kind": r.kind,
                                "trigger": trigger,
                                "policy": r.policy.name if r.policy else None,
                                "campaign": getattr(campaign, "pk", None),
                            },
                        )
                    )
        _audit_many(actor=actor, action="rotation.start", items=audit_items)
        from .tasks import rotation_deliver

        for ids in _chunks(created_ids, settings.ROTATION_DELIVER_CHUNK):
            _enqueue(rotation_deliver, ids)
    return len(created_ids)


def rotation_cancel(*, actor, rotation: CredentialRotation, reason: str = "") -> CredentialRotation:
    """Stop an open rotation. The device keeps the credential the broker holds: before the switch that is its old
    secret (a new one it may have stored is simply never accepted; the device falls back to the previous)."""
    _authorise(actor, "devices.rotate_credentials")
    with transaction.atomic():
        rotation = CredentialRotation.objects.select_for_update().get(pk=rotation.pk)
        if rotation.state not in (State.PENDING, State.DELIVERED, State.CONFIRMED):
            raise ValidationError(
                f"Rotation #{rotation.pk} is {rotation.get_state_display().lower()}; only a rotation that has not "
                "switched the broker yet can be cancelled."
            )
        before = {"state": rotation.state}
        rotation.state = State.CANCELLED
        rotation.pending_hash = ""
        rotation.history = _append(rotation.history, _step("cancel", detail=reason or f"by {_actor_label(actor)}"))
        rotation.save(update_fields=["state", "pending_hash", "history", "updated"])
        audit_record(
            actor=actor,
            action="rotation.cancel",
            object_type="device",
            object_id=rotation.client_id,
            before=before,
            after={"rotation": rotation.pk, "state": rotation.state, "reason": reason},
        )
    return rotation


# --- deliver -------------------------------------------------------------------------------------------------------


def credentials_message(*, command_id: str, secret: str, rotation_id: int, now: float) -> bytes:
    """The `credentials` message of docs/device-protocol.md, validated by the device library's own schema."""
    return protocol.encode(
        "credentials",
        id=command_id,
        ts=round(now, 3),
        expires=round(now + settings.ROTATION_MESSAGE_TTL_SECONDS, 3),
        secret=secret,
        credential_id=f"rot-{rotation_id}",
    )


def rotation_deliver(*, rotation_ids: list[int], resend: bool = False) -> dict:
    """Send the new secret to each device (secret rotations) or ask for a CSR (certificate rotations, H3's module).

    First delivery takes rows still pending; ``resend`` also takes delivered rows (the device came back, or never
    confirmed). Each send makes a fresh secret and command id, written (hash only) before anything is published, so
    an ack can never arrive for a secret the database does not know. Idempotent under redelivery of the task: a row
    already confirmed (or further) is never touched, and the worst case of a crash is one more fresh secret."""
    states = [State.PENDING, State.DELIVERED] if resend else [State.PENDING]
    outcome = {"published": 0, "failed": 0, "skipped": 0, "certificate": 0}
    ids = list(rotation_ids)
    certificate_ids = list(
        CredentialRotation.objects.filter(pk__in=ids, state__in=states, kind=CredentialRotation.Kind.CERTIFICATE)
        .order_by()
        .values_list("id", flat=True)
    )
    if certificate_ids:
        from . import certificates
        from .commander import CommanderUnavailable

        # One commander connection for the whole chunk, as for secrets.
        sent_certificates = certificates.certificate_renew_deliver_many(rotation_ids=certificate_ids)
        outcome["certificate"] += sent_certificates["sent"]
        if sent_certificates["failed"]:
            raise CommanderUnavailable(f"{sent_certificates['failed']} certificate renewals were not acknowledged")
    messages: list[tuple[str, bytes]] = []
    sent: list[tuple[int, str]] = []  # (rotation id, command id) per message
    now = timezone.now()
    with transaction.atomic():
        rows = list(
            CredentialRotation.objects.select_for_update(of=("self",))
            .filter(pk__in=ids, state__in=states, kind=CredentialRotation.Kind.SECRET)
            .order_by("pk")
            .values("id", "client_id", "attempts", "device_id", "device__status", "device__last_seen")
        )
        cancelled = [r["id"] for r in rows if r["device_id"] is None or r["device__status"] not in ROTATABLE_STATUSES]
        if cancelled:
            _bulk_step(
                cancelled,
                _step("deliver", "cancelled", "the device left the fleet", at=now),
                state=State.CANCELLED,
                pending_hash="",
            )
        per_row: list[tuple[str, str, int]] = []
        by_attempt: dict[tuple[int, bool], list[int]] = defaultdict(list)
        # A device not seen for ROTATION_RESEND_SECONDS is probably offline: when it is seen again, it gets the
        # message again at once (the tick), instead of waiting out the blind re-send's backoff.
        away_before = now - timedelta(seconds=settings.ROTATION_RESEND_SECONDS)
        skip = set(cancelled)
        for row in rows:
            if row["id"] in skip:
                continue
            # The plaintext lives only in the message below, which is published and dropped.
            secret = secrets.token_urlsafe(SECRET_BYTES)
            attempt = row["attempts"] + 1
            command_id = command_id_for(row["id"], attempt)
            pending_hash = hash_secret(secret, iterations=settings.MQTT_PASSWORD_ITERATIONS)
            messages.append(
                (
                    topics.rx_topic(row["client_id"], topics.RX_CREDENTIALS),
                    credentials_message(
                        command_id=command_id, secret=secret, rotation_id=row["id"], now=now.timestamp()
                    ),
                )
            )
            per_row.append((command_id, pending_hash, row["id"]))
            away = row["device__last_seen"] is None or row["device__last_seen"] < away_before
            by_attempt[(attempt, away)].append(row["id"])
            sent.append((row["id"], command_id))
        _update_per_row(CredentialRotation, ["command_id", "pending_hash"], per_row)
        for (attempt, away), attempt_ids in by_attempt.items():
            entry = _step("deliver", "sending", at=now, attempt=attempt)
            if away:
                entry["device_away"] = True
            _bulk_step(attempt_ids, entry, attempts=attempt, last_error="")
        outcome["skipped"] = len(ids) - len(rows) - len(certificate_ids)
    if not messages:
        return outcome
    try:
        result = commander.publish(messages)
    except commander.CommanderUnavailable as exc:
        _delivery_failed(sent, str(exc))
        raise
    acked = [rid for (rid, _), ok in zip(sent, result.acknowledged, strict=True) if ok]
    failed = [(rid, cid) for (rid, cid), ok in zip(sent, result.acknowledged, strict=True) if not ok]
    delivered_at = timezone.now()
    for chunk in _chunks(acked, CHUNK):
        # Only rows still waiting: an ack may already have confirmed one of them.
        CredentialRotation.objects.filter(pk__in=chunk, state=State.PENDING).update(
            state=State.DELIVERED, delivered_at=delivered_at, updated=delivered_at
        )
        CredentialRotation.objects.filter(pk__in=chunk, state=State.DELIVERED).update(
            delivered_at=delivered_at, updated=delivered_at
        )
    if failed:
        errors = {sent[i][0]: err for i, err in result.errors.items()}
        for rid, cid in failed:
            _delivery_failed([(rid, cid)], errors.get(rid) or "the broker did not acknowledge the message in time")
    outcome["published"], outcome["failed"] = len(acked), len(failed)
    return outcome


def _delivery_failed(sent: list[tuple[int, str]], error: str) -> None:
    """Record the failed attempt on rows that still carry the command id we tried (never on a newer one)."""
    for rid, command_id in sent:
        with transaction.atomic():
            row = (
                CredentialRotation.objects.select_for_update()
                .filter(pk=rid, command_id=command_id, state__in=[State.PENDING, State.DELIVERED])
                .first()
            )
            if row is None:
                continue
            row.last_error = error[:2000]
            row.history = _append(row.history, _step("deliver", "failed", error))
            row.save(update_fields=["last_error", "history", "updated"])


# --- confirm (acks from tx/<id>/ack, handed over by the consumer through the inbox) ---------------------------------


def rotations_confirm(*, acks: list[tuple[str, str, str, str]]) -> dict:
    """(client_id, command_id, status, detail) of many acks at once, in one transaction: ok -> confirmed and the
    switch is enqueued; rejected/failed/expired -> recorded (expired: re-sent; rejected/failed: the rotation fails and
    an alert is raised). Unknown, stale (a superseded command id) and duplicate acks are counted and ignored."""
    counts = {"confirmed": 0, "refused": 0, "expired": 0, "stale": 0}
    if not acks:
        return counts
    by_command = {command_id: (client_id, status, detail) for client_id, command_id, status, detail in acks}
    confirmed: list[tuple[int, str]] = []  # (id, client id)
    refused_ids: list[int] = []
    resend_ids: list[int] = []
    now = timezone.now()
    with transaction.atomic():
        rows = []
        for chunk in _chunks(list(by_command), CHUNK):
            rows += list(
                CredentialRotation.objects.select_for_update()
                .filter(command_id__in=chunk, state__in=[State.PENDING, State.DELIVERED])
                .values("id", "client_id", "command_id")
            )
        for row in rows:
            client_id, status, detail = by_command[row["command_id"]]
            if client_id != row["client_id"]:  # an ack for another device's command id: never
                continue
            if status == "ok":
                confirmed.append((row["id"], row["client_id"]))
            elif status == "expired":
                resend_ids.append(row["id"])
            else:
                refused_ids.append(row["id"])
        _bulk_step(
            [pk for pk, _ in confirmed],
            _step("confirm", at=now),
            state=State.CONFIRMED,
            confirmed_at=now,
            delivered_at=Coalesce(F("delivered_at"), Value(now)),
        )
        if resend_ids:
            _bulk_step(resend_ids, _step("confirm", "expired", "the message arrived after its expiry; sent again"))
        refused = list(CredentialRotation.objects.filter(pk__in=refused_ids).select_related("device"))
        for row in refused:
            _client_id, status, detail = by_command[row.command_id]
            row.state, row.failed_at, row.pending_hash = State.FAILED, now, ""
            row.last_error = f"the device answered {status}: {detail}"[:2000]
            row.history = _append(row.history, _step("confirm", status, detail, at=now))
            row.save(update_fields=["state", "failed_at", "pending_hash", "last_error", "history", "updated"])
        with audit_context(service="rotation"):
            _audit_many(
                actor=None,
                action="rotation.confirm",
                items=[(client_id, {"rotation": pk, "status": "confirmed"}) for pk, client_id in confirmed],
            )
            for row in refused:
                _alert(
                    kind="rotation_rejected",
                    row=row,
                    summary=f"{row.client_id} refused its new secret ({row.last_error[:120]}); it keeps the old one",
                )
        confirmed_ids = [pk for pk, _ in confirmed]
        from .tasks import rotation_deliver_resend, rotation_switch

        for ids in _chunks(confirmed_ids, settings.ROTATION_DELIVER_CHUNK):
            _enqueue(rotation_switch, ids)
        if resend_ids:
            _enqueue(rotation_deliver_resend, resend_ids)
    counts.update(
        confirmed=len(confirmed_ids),
        refused=len(refused),
        expired=len(resend_ids),
        stale=len(acks) - len(confirmed_ids) - len(refused) - len(resend_ids),
    )
    if counts["stale"]:
        log.info("rotation: %d acks for unknown or superseded command ids ignored", counts["stale"])
    return counts


def rotation_confirm(*, client_id: str, command_id: str, status: str, detail: str = "") -> CredentialRotation | None:
    """One ack. Returns the rotation it confirmed (or failed), None for an unknown or stale command id."""
    counts = rotations_confirm(acks=[(client_id, command_id, status, detail)])
    if counts["stale"]:
        return None
    return CredentialRotation.objects.filter(command_id=command_id, client_id=client_id).first()


# --- switch ----------------------------------------------------------------------------------------------------------


def _switch_budget(counts_by_policy: dict[int | None, int], limits: dict[int | None, int]) -> dict[int | None, int]:
    """How many switches each policy may make now: a fixed one-minute window per policy in Redis, shared by every
    worker. Without Redis there is no worker either, so nothing is limited."""
    allowed: dict[int | None, int] = {}
    try:
        client = redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=2)
        minute = int(timezone.now().timestamp() // 60)
        for policy_id, wanted in counts_by_policy.items():
            limit = limits.get(policy_id, 0)
            if limit <= 0:
                allowed[policy_id] = wanted
                continue
            key = f"{SWITCH_BUDGET_KEY}:{policy_id or 'none'}:{minute}"
            pipe = client.pipeline()
            pipe.incrby(key, wanted)
            pipe.expire(key, 120)
            used = pipe.execute()[0]
            grant = max(0, min(wanted, limit - (used - wanted)))
            if grant < wanted:
                client.decrby(key, wanted - grant)
            allowed[policy_id] = grant
    except redis.ConnectionError:
        return dict(counts_by_policy)
    return allowed


def rotation_switch(*, rotation_ids: list[int]) -> dict:
    """Move confirmed secrets into the broker: DeviceCredential.password_hash := pending_hash, one outbox row for the
    whole batch (one reload re-authenticates every connected client: each rotated device is dropped and reconnects
    with its new secret, which is the proof). Limited per policy to switches_per_minute; the rest is deferred
    (returned, and re-enqueued by the task with a countdown)."""
    now = timezone.now()
    result = {"switched": 0, "cancelled": 0, "deferred": [], "change": None}
    with transaction.atomic():
        rows = list(
            CredentialRotation.objects.select_for_update(of=("self",))
            .filter(pk__in=list(rotation_ids), state=State.CONFIRMED, kind=CredentialRotation.Kind.SECRET)
            .order_by("pk")
            .values(
                "id",
                "client_id",
                "device_id",
                "device__status",
                "policy_id",
                "policy__switches_per_minute",
                "pending_hash",
            )
        )
        if not rows:
            return result
        wanted: dict[int | None, int] = defaultdict(int)
        limits: dict[int | None, int] = {}
        for row in rows:
            wanted[row["policy_id"]] += 1
            limits[row["policy_id"]] = row["policy__switches_per_minute"] or 0
        budget = _switch_budget(dict(wanted), limits)
        with_credential = set()
        for chunk in _chunks([r["device_id"] for r in rows if r["device_id"]], CHUNK):
            with_credential |= set(
                DeviceCredential.objects.filter(device_id__in=chunk).values_list("device_id", flat=True)
            )
        switched, cancelled = [], []
        for row in rows:
            if row["device_id"] not in with_credential or row["device__status"] not in ROTATABLE_STATUSES:
                cancelled.append(row["id"])
            elif budget.get(row["policy_id"], 0) <= 0:
                result["deferred"].append(row["id"])
            else:
                budget[row["policy_id"]] -= 1
                switched.append(row)
        if cancelled:
            _bulk_step(
                cancelled,
                _step("switch", "cancelled", "the device lost its credential", at=now),
                state=State.CANCELLED,
                pending_hash="",
            )
        change = None
        if switched:
            _update_per_row(
                DeviceCredential,
                ["password_hash"],
                [(r["pending_hash"], r["device_id"]) for r in switched],
                key="device_id",
            )
            device_ids = [r["device_id"] for r in switched]
            for chunk in _chunks(device_ids, CHUNK):
                DeviceCredential.objects.filter(device_id__in=chunk).update(
                    issued_at=now, issued_by=None, source=DeviceCredential.Source.GENERATED
                )
            change = enforcement_enqueue(
                kind="credential.rotate",
                client_id=switched[0]["client_id"] if len(switched) == 1 else "",
                summary=f"{len(switched)} rotated secret{'s' if len(switched) != 1 else ''} replace the old ones",
            )
            _bulk_step(
                [r["id"] for r in switched],
                _step("switch", at=now, change=change.pk),
                state=State.SWITCHED,
                pending_hash="",
                switched_at=now,
            )
        with audit_context(service="rotation"):
            _audit_many(
                actor=None,
                action="credential.rotate",
                items=[(r["client_id"], {"rotation": r["id"], "change": change.pk}) for r in switched],
            )
    result.update(switched=len(switched), cancelled=len(cancelled), change=change.pk if change else None)
    return result


# --- completion, re-sends, deadlines (the rotation tick) -------------------------------------------------------------


def _alert(*, kind: str, row: CredentialRotation, summary: str, extra: dict | None = None) -> None:
    from security.detection.alerts import alert_raise

    alert_raise(
        kind=kind,
        subject=row.client_id,
        client_id=row.client_id,
        device=row.device if row.device_id else None,
        summary=summary,
        evidence={
            "rotation": row.pk,
            "state": row.state,
            "attempts": row.attempts,
            "delivered_at": row.delivered_at.isoformat() if row.delivered_at else None,
            "switched_at": row.switched_at.isoformat() if row.switched_at else None,
            **(extra or {}),
        },
    )


def _switch_change_id(history: list) -> int | None:
    for entry in reversed(history or []):
        if entry.get("step") == "switch" and entry.get("change"):
            return entry["change"]
    return None


def rotations_complete_proven(*, now: datetime | None = None) -> dict:
    """A switched rotation is complete when the broker applied the switch and the device has connected since: the
    device library publishes `status` on every connect, and the reload dropped the session that used the old secret
    (docs/rotation.md says why this is the proof). Not proven within ROTATION_PROOF_TIMEOUT_SECONDS: an alert
    (rotation_unproven), once; the row stays switched and completes if the device turns up later."""
    now = now or timezone.now()
    counts = {"completed": 0, "alerted": 0, "waiting": 0}
    rows = list(CredentialRotation.objects.filter(state=State.SWITCHED, kind=CredentialRotation.Kind.SECRET))
    if not rows:
        return counts
    change_ids = {row.pk: _switch_change_id(row.history) for row in rows}
    applied = dict(
        EnforcementChange.objects.filter(pk__in=[c for c in change_ids.values() if c], state="applied").values_list(
            "pk", "applied_at"
        )
    )
    status_at: dict[str, datetime | None] = {}
    for chunk in _chunks([r.client_id for r in rows], CHUNK):
        status_at.update(DeviceActivity.objects.filter(client_id__in=chunk).values_list("client_id", "last_status_at"))
    completed, alerted = [], []
    timeout = timedelta(seconds=settings.ROTATION_PROOF_TIMEOUT_SECONDS)
    for row in rows:
        seen = status_at.get(row.client_id)
        if change_ids[row.pk] in applied and seen is not None and seen > row.switched_at:
            completed.append(row)
        elif row.switched_at < now - timeout and not any(h.get("step") == "unproven" for h in row.history):
            row.history = _append(row.history, _step("unproven", "alerted", "no reconnect since the switch"))
            alerted.append(row)
        else:
            counts["waiting"] += 1
    with transaction.atomic():
        moved = _bulk_step(
            [r.pk for r in completed],
            _step("complete", at=now, detail="the device reconnected with its new secret"),
            guard={"state": State.SWITCHED},  # a concurrent tick may have got there first
            state=State.COMPLETED,
            completed_at=now,
        )
        still = set(
            CredentialRotation.objects.select_for_update()
            .filter(pk__in=[r.pk for r in alerted], state=State.SWITCHED)
            .values_list("pk", flat=True)
        )
        alerted = [r for r in alerted if r.pk in still]
        for row in alerted:
            row.save(update_fields=["history", "updated"])
        with audit_context(service="rotation"):
            _audit_many(
                actor=None, action="rotation.complete", items=[(r.client_id, {"rotation": r.pk}) for r in completed]
            )
            for row in alerted:
                _alert(
                    kind="rotation_unproven",
                    row=row,
                    summary=f"{row.client_id} has not reconnected since the broker switched to its new secret",
                )
    counts.update(completed=moved, alerted=len(alerted))
    return counts


def rotations_expire(*, now: datetime | None = None) -> dict:
    """Pending or delivered rotations past their deadline fail. The policy decides what happens to the device:
    keep_alert (default) keeps the old credential, which the broker never stopped accepting, and raises
    rotation_unconfirmed; revoke revokes the device (security.services.device_revoke)."""
    from security.services import device_revoke

    now = now or timezone.now()
    counts = {"failed": 0, "revoked": 0}
    with transaction.atomic():
        rows = list(
            CredentialRotation.objects.select_for_update(of=("self",))
            .filter(state__in=[State.PENDING, State.DELIVERED], deadline__lt=now)
            .select_related("device", "policy")
        )
        reason = "not confirmed by the device within the grace period"
        _bulk_step(
            [r.pk for r in rows],
            _step("deadline", "failed", reason, at=now),
            state=State.FAILED,
            failed_at=now,
            pending_hash="",
            last_error=reason,
        )
        for row in rows:
            row.state, row.failed_at, row.last_error = State.FAILED, now, reason
        with audit_context(service="rotation"):
            _audit_many(
                actor=None,
                action="rotation.failed",
                items=[(r.client_id, {"rotation": r.pk, "reason": r.last_error}) for r in rows],
            )
            for row in rows:
                revoke = row.policy is not None and row.policy.on_unconfirmed == RotationPolicy.OnUnconfirmed.REVOKE
                device = row.device
                if revoke and device is not None and device.status in ROTATABLE_STATUSES:
                    device_revoke(
                        actor=None,
                        device=device,
                        reason=f"credential rotation #{row.pk} not confirmed within {row.policy.grace_hours} h "
                        f"(policy {row.policy.name})",
                    )
                    counts["revoked"] += 1
                _alert(
                    kind="rotation_unconfirmed",
                    row=row,
                    summary=f"{row.client_id} did not confirm its new secret within the grace period; "
                    + ("it was revoked (policy)" if revoke else "it keeps the old one"),
                    extra={"action": "revoked" if revoke else "kept old credential"},
                )
    counts["failed"] = len(rows)
    return counts


def rotations_due(*, now: datetime | None = None) -> dict[str, list[int]]:
    """What the tick re-enqueues:
    * deliver: pending rows nobody delivered (a worker died, Redis was down);
    * resend: delivered rows not confirmed: at once when a device that was away at the last delivery has been seen
      since (it came back online), else blindly after ROTATION_RESEND_SECONDS doubling with each attempt (up to 64x:
      the message or its ack was lost; a device that never answers is not flooded);
    * switch: confirmed rows nobody switched."""
    now = now or timezone.now()
    stalled = now - timedelta(seconds=settings.ROTATION_STALLED_SECONDS)
    resend_after = timedelta(seconds=settings.ROTATION_RESEND_SECONDS)
    deliver = list(
        CredentialRotation.objects.filter(state=State.PENDING, updated__lt=stalled)
        .order_by("pk")
        .values_list("pk", flat=True)
    )
    switch = list(
        CredentialRotation.objects.filter(state=State.CONFIRMED, updated__lt=stalled, kind="secret")
        .order_by("pk")
        .values_list("pk", flat=True)
    )
    resend = []
    candidates = (
        CredentialRotation.objects.filter(state=State.DELIVERED, delivered_at__lt=now - resend_after)
        .order_by("pk")
        .values_list("pk", "attempts", "delivered_at", "device__last_seen", "history")
    )
    for pk, attempts, delivered_at, last_seen, history in candidates.iterator(chunk_size=2000):
        last_delivery = next((h for h in reversed(history or []) if h.get("step") == "deliver"), {})
        came_back = last_delivery.get("device_away") and last_seen is not None and last_seen > delivered_at
        backoff = resend_after * (2 ** min(max(attempts - 1, 0), 6))
        if came_back or now > delivered_at + backoff:
            resend.append(pk)
    return {"deliver": deliver, "resend": resend, "switch": switch}


def rotation_tick() -> dict:
    """The periodic job: complete what is proven, fail what is overdue, re-enqueue what stalled or is due again."""
    from .tasks import rotation_deliver, rotation_deliver_resend, rotation_switch

    with audit_context(service="rotation"):
        outcome = {"completed": rotations_complete_proven(), "expired": rotations_expire()}
        due = rotations_due()
        with transaction.atomic():
            for ids in _chunks(due["deliver"], settings.ROTATION_DELIVER_CHUNK):
                _enqueue(rotation_deliver, ids)
            for ids in _chunks(due["resend"], settings.ROTATION_DELIVER_CHUNK):
                _enqueue(rotation_deliver_resend, ids)
            for ids in _chunks(due["switch"], settings.ROTATION_DELIVER_CHUNK):
                _enqueue(rotation_switch, ids)
        apply = switches_unapplied()
        if apply:
            from security.tasks import apply_enforcement

            transaction.on_commit(lambda: apply_enforcement.delay(apply))
    outcome["requeued"] = {k: len(v) for k, v in due.items()}
    outcome["requeued"]["apply"] = int(bool(apply))
    return outcome


def switches_unapplied(*, now: datetime | None = None) -> int | None:
    """A switch whose outbox row is still pending after ROTATION_STALLED_SECONDS (the worker died between the switch and
    the broker reload, or Redis lost the task): the newest such row's id, so one apply (which takes every pending row)
    puts the broker in step without waiting for the reconcile job. None when there is none."""
    now = now or timezone.now()
    stalled = now - timedelta(seconds=settings.ROTATION_STALLED_SECONDS)
    return (
        EnforcementChange.objects.filter(kind="credential.rotate", state__in=["pending", "failed"], created__lt=stalled)
        .order_by("-pk")
        .values_list("pk", flat=True)
        .first()
    )


def seconds_to_next_minute() -> float:
    """When the per-policy switch budget (a one-minute window) renews."""
    now = timezone.now().timestamp()
    return 60 - now % 60 + 0.5
