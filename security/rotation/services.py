"""The device-confirmed secret handover (issue 7, docs/rotation.md): start, deliver, confirm, switch, complete.
This module is the entry point: starting and cancelling rotations live here, the later steps in ``handover`` (deliver,
confirm, switch) and ``tick`` (completion, deadlines, re-sends), the shared bookkeeping in ``rows``.

Every step is a durable CredentialRotation row with attempts, times and a history. At most one open rotation per
device (a database constraint), so a retried task or a second start never rotates a device twice. The plaintext of a
new secret exists only in the outgoing message: the row keeps Mosquitto's hash (``pending_hash``) until the switch
moves it into the device's DeviceCredential. A re-send makes a fresh secret and a new command id.

Written for batches (10,000 devices): starts are bulk inserts, deliveries publish a chunk per connection, acks of a
consumer batch are confirmed in one transaction, and one switch batch is one outbox row (one broker reload).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import Exists, OuterRef
from django.utils import timezone

from devices.models import Device
from security.audit import actor_label, audit_record, audit_record_many
from security.models import (
    CredentialRotation,
    DeviceCertificate,
    DeviceCredential,
    RotationPolicy,
)
from security.services import _authorise

# The later steps live in their own modules (handover: deliver, confirm, switch; tick: completion, deadlines,
# re-sends); this module stays the one entry point callers import.
from .handover import (
    credentials_message,
    rotation_confirm,
    rotation_deliver,
    rotation_switch,
    rotations_confirm,
    seconds_to_next_minute,
)
from .rows import (
    CHUNK,
    OPEN_STATES,
    ROTATABLE_STATUSES,
    State,
    _alert,
    _append,
    _chunks,
    _enqueue,
    _placeholder_command_id,
    _step,
    _switch_change_id,
    command_id_for,
)
from .tick import (
    rotation_tick,
    rotations_complete_proven,
    rotations_due,
    rotations_expire,
    switches_unapplied,
)

__all__ = [
    "RotationNotPossible",
    "command_id_for",
    "credentials_message",
    "policies_for_devices",
    "policy_for_device",
    "rotation_cancel",
    "rotation_confirm",
    "rotation_deliver",
    "rotation_kind",
    "rotation_start",
    "rotation_start_many",
    "rotation_switch",
    "rotation_tick",
    "rotations_complete_proven",
    "rotations_confirm",
    "rotations_due",
    "rotations_expire",
    "seconds_to_next_minute",
    "switches_unapplied",
    # Shared bookkeeping some callers (and tests) use.
    "_alert",
    "_switch_change_id",
]

log = logging.getLogger(__name__)


class RotationNotPossible(ValidationError):
    """A single-device rotation was asked for and cannot start; the message says why and what to do."""


def rotation_kind(*, has_credential: bool, has_active_certificate: bool) -> str | None:
    """secret when the device has a broker secret; certificate when it authenticates with a certificate only;
    None when it has nothing to rotate."""
    if has_credential:
        return CredentialRotation.Kind.SECRET
    if has_active_certificate:
        return CredentialRotation.Kind.CERTIFICATE
    return None


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
    label = actor_label(actor)
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
        audit_record_many(actor=actor, action="rotation.start", items=audit_items)
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
        rotation.history = _append(rotation.history, _step("cancel", detail=reason or f"by {actor_label(actor)}"))
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
