"""The rotation tick (a django-celery-beat entry, ROTATION_TICK_SECONDS): complete switched rotations the device's
reconnect proved, fail what passed its deadline (and apply the policy's choice), and re-enqueue what a dead worker or
a lost message left behind."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from security.audit import audit_context, audit_record_many
from security.models import (
    CredentialRotation,
    DeviceActivity,
    EnforcementChange,
    RotationPolicy,
)

from .rows import (
    CHUNK,
    ROTATABLE_STATUSES,
    State,
    _alert,
    _append,
    _bulk_step,
    _chunks,
    _enqueue,
    _step,
    _switch_change_id,
)

log = logging.getLogger(__name__)


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
            audit_record_many(
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
    rotation_unconfirmed; revoke revokes the device through the revocation service (a verified DeviceAction)."""
    from security.revocation import device_action_request

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
            audit_record_many(
                actor=None,
                action="rotation.failed",
                items=[(r.client_id, {"rotation": r.pk, "reason": r.last_error}) for r in rows],
            )
            for row in rows:
                revoke = row.policy is not None and row.policy.on_unconfirmed == RotationPolicy.OnUnconfirmed.REVOKE
                device = row.device
                if revoke and device is not None and device.status in ROTATABLE_STATUSES:
                    device_action_request(
                        actor=None,
                        device=device,
                        action="revoke",
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
