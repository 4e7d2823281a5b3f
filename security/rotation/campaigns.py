"""Rotation campaigns (issue 7, "Campaigns"): a fleet-wide rotation in waves, a small canary wave first.

* The operator picks devices with the device list's filters, sees how many match and can rotate, and confirms by
  typing that number; the device ids and the waves are fixed then (``campaign_create``).
* ``campaign_advance`` (run by the task ``security.rotation_campaign_advance``, which re-enqueues itself) starts one
  wave at a time through ``rotation_start_many``, waits until the wave's rotations settle or the wave times out,
  then judges it against the baseline (``wave_judge``) and either starts the next wave or pauses the campaign with
  the reason. Everything it needs is in the database: a worker that dies mid-wave loses nothing, and the next run
  (the task's own re-enqueue, or ``campaign_resume_stalled`` from the periodic job) carries on. A device already
  rotated by this campaign is never started again.
* The baseline (docs/rotation.md says why): a wave's confirmation rate is compared with the share of its devices
  that were online when it started (a device that is offline cannot confirm inside a wave); its reconnect rate
  (confirmed devices that came back with the new secret) with the fleet's recent reconnect rate outside this
  campaign, or 100 % when the fleet has too few recent rotations to say.
* Operators pause, resume and abort; abort cancels the campaign's rotations that have not switched yet.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Exists, OuterRef
from django.utils import timezone

from devices.models import Device
from security.audit import actor_label, audit_context, audit_record, current_context
from security.confirmation import typed_count_check
from security.models import CredentialRotation, DeviceCertificate, DeviceCredential, RotationCampaign, RotationWave
from security.permissions import require
from security.revocation import bulk_filters_clean, bulk_queryset

from .selectors import campaign_summary
from .waves import (
    CONFIRMED_OR_LATER,
    ID_CHUNK,
    Verdict,
    _online_share,
    fleet_reconnect_baseline,
    plan_waves,
    wave_counts,
    wave_judge,
)

logger = logging.getLogger(__name__)

CHANGE_PERMISSION = "devices.rotate_credentials"
SERVICE = "rotation-campaign"
KINDS = ("secret", "certificate")
MAX_DEVICES = 200_000
MAX_NAME = 200
MAX_REASON = 2000
ROTATABLE_STATUSES = (Device.Status.ACTIVE, Device.Status.QUARANTINED)
# A wave is settled when none of its rotations is in one of these states (certificates: confirmed is the device's
# last step inside a wave; the old certificate is revoked only after the grace).
UNSETTLED = {
    "secret": ("pending", "delivered", "confirmed", "switched"),
    "certificate": ("pending", "delivered"),
}


def _authorise(actor) -> None:
    if actor is None:
        if current_context().service:
            return
        raise ValidationError("No actor: call this as a user or as a named service.")
    require(actor, CHANGE_PERMISSION)


# --- which devices a campaign can take ------------------------------------------------------------------------


def eligible_queryset(qs, *, kind: str):
    """Devices that can rotate this kind of credential: active or quarantined (the credentials channel is their
    repair path), with a secret (kind secret) or with an active certificate and no secret (kind certificate)."""
    qs = qs.filter(status__in=ROTATABLE_STATUSES)
    has_secret = Exists(DeviceCredential.objects.filter(device_id=OuterRef("pk")))
    if kind == "secret":
        return qs.filter(has_secret)
    active_cert = Exists(
        DeviceCertificate.objects.filter(
            device_id=OuterRef("pk"), status=DeviceCertificate.Status.ACTIVE, not_after__gt=timezone.now()
        )
    )
    return qs.filter(active_cert).exclude(has_secret)


def _kind_clean(kind: str | None) -> str:
    kind = (kind or "secret").strip()
    if kind not in KINDS:
        raise ValidationError({"kind": [f"A campaign rotates {' or '.join(KINDS)} credentials, not {kind!r}."]})
    return kind


def campaign_preview(*, filters, kind: str = "secret", canary_size: int = 10, wave_size: int = 1000) -> dict:
    """What the create form shows before the typed confirmation."""
    filters = bulk_filters_clean(filters)
    kind = _kind_clean(kind)
    qs = bulk_queryset(filters)
    matched = qs.count()
    eligible_qs = eligible_queryset(qs, kind=kind)
    eligible = eligible_qs.count()
    sample = list(eligible_qs.order_by("client_id").values_list("client_id", flat=True)[:10])
    sizes = [
        len(w) for w in plan_waves(list(range(eligible)), canary_size=max(1, canary_size), wave_size=max(1, wave_size))
    ]
    return {
        "filters": filters,
        "kind": kind,
        "matched": matched,
        "eligible": eligible,
        "skipped": matched - eligible,
        "sample": sample,
        "waves": len(sizes),
        "wave_sizes": sizes[:3] + (["…"] if len(sizes) > 3 else []),
    }


@dataclass(frozen=True)
class CampaignSettings:
    canary_size: int = 10
    wave_size: int = 1000
    min_confirm_ratio: float = 0.9
    min_reconnect_ratio: float = 0.9
    wave_timeout_seconds: int = 300

    @classmethod
    def from_data(cls, data) -> CampaignSettings:
        """From a form's or serializer's cleaned data: the fields it has, the defaults for the rest."""
        import dataclasses

        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


def _settings_clean(values: CampaignSettings) -> CampaignSettings:
    errors = {}
    if not 1 <= values.canary_size <= 10_000:
        errors["canary_size"] = ["The canary wave has 1 to 10,000 devices."]
    if not 1 <= values.wave_size <= 50_000:
        errors["wave_size"] = ["A wave has 1 to 50,000 devices."]
    for name in ("min_confirm_ratio", "min_reconnect_ratio"):
        value = getattr(values, name)
        if not 0.0 <= value <= 1.0:
            errors[name] = ["A share of the baseline between 0 and 1 (0.9 = pause below 90 % of it)."]
    if not 1 <= values.wave_timeout_seconds <= 7 * 86400:
        errors["wave_timeout_seconds"] = ["Between 1 second and 7 days."]
    if errors:
        raise ValidationError(errors)
    return values


def campaign_create(
    *,
    actor,
    name: str,
    filters,
    reason: str,
    confirm_count,
    kind: str = "secret",
    options: CampaignSettings | None = None,
    policy=None,
) -> RotationCampaign:
    """Fix the devices and the waves when the person confirms the number the preview showed; if the filters match a
    different number of rotatable devices now, nothing is created and they are told the new number."""
    _authorise(actor)
    options = _settings_clean(options or CampaignSettings())
    kind = _kind_clean(kind)
    filters = bulk_filters_clean(filters)
    name = (name or "").strip()
    reason = (reason or "").strip()
    errors = {}
    if not name:
        errors["name"] = ["Give the campaign a name (it is shown on its page and in the audit log)."]
    elif len(name) > MAX_NAME:
        errors["name"] = [f"Keep the name under {MAX_NAME} characters."]
    if not reason:
        errors["reason"] = ["Say why the fleet is rotated (it goes into the audit log)."]
    elif len(reason) > MAX_REASON:
        errors["reason"] = [f"Keep the reason under {MAX_REASON} characters."]
    if errors:
        raise ValidationError(errors)
    with transaction.atomic():
        ids = list(eligible_queryset(bulk_queryset(filters), kind=kind).order_by("pk").values_list("pk", flat=True))
        if not ids:
            raise ValidationError({"filters": [f"No device matching these filters can rotate a {kind} credential."]})
        if len(ids) > MAX_DEVICES:
            raise ValidationError({"filters": [f"At most {MAX_DEVICES} devices per campaign; narrow the filters."]})
        typed_count_check(typed=confirm_count, matched=len(ids), can="can rotate now")
        campaign = RotationCampaign.objects.create(
            name=name,
            kind=kind,
            filters=filters,
            reason=reason,
            device_ids=ids,
            total=len(ids),
            canary_size=options.canary_size,
            wave_size=options.wave_size,
            min_confirm_ratio=options.min_confirm_ratio,
            min_reconnect_ratio=options.min_reconnect_ratio,
            wave_timeout_seconds=options.wave_timeout_seconds,
            policy=policy,
            created_by=actor if getattr(actor, "is_authenticated", False) else None,
            created_by_label=actor_label(actor),
        )
        RotationWave.objects.bulk_create(
            [
                RotationWave(campaign=campaign, number=n, device_ids=wave_ids, size=len(wave_ids))
                for n, wave_ids in enumerate(
                    plan_waves(ids, canary_size=options.canary_size, wave_size=options.wave_size)
                )
            ]
        )
        audit_record(
            actor=actor,
            action="rotation_campaign.create",
            object_type="rotationcampaign",
            object_id=str(campaign.pk),
            after={
                "name": name,
                "kind": kind,
                "filters": filters,
                "devices": len(ids),
                "reason": reason,
                "canary_size": options.canary_size,
                "wave_size": options.wave_size,
                "min_confirm_ratio": options.min_confirm_ratio,
                "min_reconnect_ratio": options.min_reconnect_ratio,
                "wave_timeout_seconds": options.wave_timeout_seconds,
            },
        )
        transaction.on_commit(lambda: enqueue(campaign.pk))
    return campaign


def enqueue(campaign_id: int, *, countdown: float | None = None) -> None:
    from security.rotation.campaign_tasks import rotation_campaign_advance

    try:
        if countdown:
            rotation_campaign_advance.apply_async((campaign_id,), countdown=countdown)
        else:
            rotation_campaign_advance.delay(campaign_id)
    except Exception:  # the row is durable: the periodic job resumes it
        logger.exception("could not enqueue rotation campaign %s; the periodic job resumes it", campaign_id)


# --- the state machine ----------------------------------------------------------------------------------------


def _client_ids(device_ids: list[int]) -> list[str]:
    out: list[str] = []
    for i in range(0, len(device_ids), ID_CHUNK):
        out += list(Device.objects.filter(pk__in=device_ids[i : i + ID_CHUNK]).values_list("client_id", flat=True))
    return out


def _wave_start(campaign: RotationCampaign, wave: RotationWave) -> int:
    """Start the wave's rotations. Devices this campaign already rotated (any wave, any state) are left out, so a
    wave started again after a crash never rotates anyone twice."""
    from security.rotation.services import rotation_start_many

    now = timezone.now()
    already = (
        set(
            CredentialRotation.objects.filter(campaign=campaign, device_id__in=wave.device_ids).values_list(
                "device_id", flat=True
            )
        )
        if len(wave.device_ids) <= ID_CHUNK
        else set(CredentialRotation.objects.filter(campaign=campaign).values_list("device_id", flat=True))
    )
    todo = [pk for pk in wave.device_ids if pk not in already]
    online, share = _online_share(wave.device_ids)
    client_ids = _client_ids(todo)
    started = 0
    if client_ids:
        started = rotation_start_many(
            actor=None,
            client_ids=client_ids,
            trigger=CredentialRotation.Trigger.CAMPAIGN,
            policy=campaign.policy,
            campaign=campaign,
            wave=wave,
        )
    wave.state = RotationWave.State.RUNNING
    wave.started_at = now
    wave.result = {
        "online_at_start": online,
        "online_share": round(share, 4),
        "requested": len(client_ids),
        "started": started,
        "skipped": wave.size - started,
    }
    wave.save(update_fields=["state", "started_at", "result"])
    audit_record(
        actor=None,
        action="rotation_campaign.wave_start",
        object_type="rotationcampaign",
        object_id=str(campaign.pk),
        after={"wave": wave.number, "devices": wave.size, "started": started, "online_share": round(share, 4)},
    )
    return started


def _wave_settle(campaign: RotationCampaign, wave: RotationWave, now) -> Verdict | None:
    """None while the wave is still running; its verdict once every rotation settled or the wave timed out."""
    counts = wave_counts(wave)
    if campaign.kind == "secret" and counts.get("switched"):
        # The reconnect proof is checked by the rotation tick every ROTATION_TICK_SECONDS; a wave waiting on it
        # checks now rather than waiting for the tick (idempotent, the same service).
        from security.rotation.services import rotations_complete_proven

        if rotations_complete_proven().get("completed"):
            counts = wave_counts(wave)
    unsettled = sum(counts.get(s, 0) for s in UNSETTLED.get(campaign.kind, UNSETTLED["secret"]))
    timed_out = now >= wave.started_at + timedelta(seconds=campaign.wave_timeout_seconds)
    if unsettled and not timed_out:
        return None
    started = sum(counts.values())
    confirmed = sum(counts.get(s, 0) for s in CONFIRMED_OR_LATER)
    return wave_judge(
        kind=campaign.kind,
        started=started,
        confirmed=confirmed,
        reconnected=counts.get("completed", 0),
        online_share=(wave.result or {}).get("online_share", 1.0),
        reconnect_baseline=(campaign.baseline or {}).get("reconnect_rate", 1.0),
        min_confirm_ratio=campaign.min_confirm_ratio,
        min_reconnect_ratio=campaign.min_reconnect_ratio,
        timed_out=bool(unsettled and timed_out),
    )


def campaign_advance(*, campaign_id: int) -> float | None:
    """One step. Returns seconds until the next step, or None when there is nothing more to do (paused, finished).
    Idempotent and resumable: every decision is made from the rows, under the campaign's row lock."""
    poll = settings.ROTATION_CAMPAIGN_POLL_SECONDS
    with audit_context(service=SERVICE), transaction.atomic():
        campaign = RotationCampaign.objects.select_for_update().filter(pk=campaign_id).first()
        if campaign is None or campaign.state not in (RotationCampaign.State.PENDING, RotationCampaign.State.RUNNING):
            return None
        now = timezone.now()
        if campaign.state == RotationCampaign.State.PENDING:
            campaign.state = RotationCampaign.State.RUNNING
            campaign.started_at = campaign.started_at or now
            baseline = fleet_reconnect_baseline(exclude_campaign_id=campaign.pk)
            online, share = _online_share(campaign.device_ids)
            baseline.update(
                confirm_source="the share of each wave's devices seen online (last "
                f"{settings.ROTATION_CAMPAIGN_ONLINE_SECONDS} s) when the wave starts",
                fleet_online_share=round(share, 4),
            )
            campaign.baseline = baseline
            audit_record(
                actor=None,
                action="rotation_campaign.start",
                object_type="rotationcampaign",
                object_id=str(campaign.pk),
                after={"baseline": baseline},
            )
        running = campaign.waves.filter(state=RotationWave.State.RUNNING).order_by("number").first()
        if running is not None:
            verdict = _wave_settle(campaign, running, now)
            if verdict is None:
                campaign.save(update_fields=["state", "started_at", "baseline", "updated"])
                return poll
            running.result = {**(running.result or {}), **verdict.result}
            running.finished_at = now
            running.state = RotationWave.State.PASSED if verdict.passed else RotationWave.State.HELD
            running.save(update_fields=["result", "finished_at", "state"])
            audit_record(
                actor=None,
                action="rotation_campaign.wave_passed" if verdict.passed else "rotation_campaign.wave_held",
                object_type="rotationcampaign",
                object_id=str(campaign.pk),
                after={"wave": running.number, **verdict.result, "reason": verdict.reason},
            )
            if not verdict.passed:
                campaign.state = RotationCampaign.State.PAUSED
                campaign.pause_reason = f"Wave {running.number}{' (canary)' if running.number == 0 else ''}: " + (
                    verdict.reason
                )
                campaign.save(update_fields=["state", "pause_reason", "started_at", "baseline", "updated"])
                audit_record(
                    actor=None,
                    action="rotation_campaign.pause",
                    object_type="rotationcampaign",
                    object_id=str(campaign.pk),
                    after={"reason": campaign.pause_reason, "automatic": True},
                )
                return None
        following = campaign.waves.filter(state=RotationWave.State.PENDING).order_by("number").first()
        if following is None:
            campaign.state = RotationCampaign.State.COMPLETED
            campaign.finished_at = now
            campaign.save(update_fields=["state", "finished_at", "started_at", "baseline", "updated"])
            audit_record(
                actor=None,
                action="rotation_campaign.complete",
                object_type="rotationcampaign",
                object_id=str(campaign.pk),
                after=campaign_summary(campaign),
            )
            return None
        _wave_start(campaign, following)
        campaign.save(update_fields=["state", "started_at", "baseline", "updated"])
    return poll


# --- operators ------------------------------------------------------------------------------------------------


def _locked(campaign: RotationCampaign) -> RotationCampaign:
    return RotationCampaign.objects.select_for_update().get(pk=campaign.pk)


def campaign_pause(*, actor, campaign: RotationCampaign, reason: str = "") -> RotationCampaign:
    """Stop starting waves. Rotations already sent carry on (their devices have the new credential)."""
    _authorise(actor)
    with transaction.atomic():
        campaign = _locked(campaign)
        if campaign.state not in (RotationCampaign.State.PENDING, RotationCampaign.State.RUNNING):
            raise ValidationError(f"Only a pending or running campaign can be paused; this one is {campaign.state}.")
        campaign.state = RotationCampaign.State.PAUSED
        campaign.pause_reason = f"Paused by {actor_label(actor)}" + (
            f": {reason.strip()[:MAX_REASON]}" if reason else "."
        )
        campaign.save(update_fields=["state", "pause_reason", "updated"])
        audit_record(
            actor=actor,
            action="rotation_campaign.pause",
            object_type="rotationcampaign",
            object_id=str(campaign.pk),
            after={"reason": campaign.pause_reason, "automatic": False},
        )
    return campaign


def campaign_resume(*, actor, campaign: RotationCampaign) -> RotationCampaign:
    """Carry on from where it stopped: a held wave stays held (it was judged); the next wave starts."""
    _authorise(actor)
    with transaction.atomic():
        campaign = _locked(campaign)
        if campaign.state != RotationCampaign.State.PAUSED:
            raise ValidationError(f"Only a paused campaign can be resumed; this one is {campaign.state}.")
        before = campaign.pause_reason
        campaign.state = RotationCampaign.State.RUNNING if campaign.started_at else RotationCampaign.State.PENDING
        campaign.pause_reason = ""
        campaign.save(update_fields=["state", "pause_reason", "updated"])
        audit_record(
            actor=actor,
            action="rotation_campaign.resume",
            object_type="rotationcampaign",
            object_id=str(campaign.pk),
            before={"pause_reason": before},
            after={"state": campaign.state},
        )
        transaction.on_commit(lambda: enqueue(campaign.pk))
    return campaign


def campaign_abort(*, actor, campaign: RotationCampaign, reason: str = "") -> RotationCampaign:
    """Stop for good: no more waves, and the campaign's rotations that have not switched yet are cancelled (the
    device keeps working with its old credential). Switched ones carry on: the broker already holds only the new
    secret."""
    from security.rotation.services import rotation_cancel

    _authorise(actor)
    with transaction.atomic():
        campaign = _locked(campaign)
        if campaign.state in (RotationCampaign.State.COMPLETED, RotationCampaign.State.ABORTED):
            raise ValidationError(f"This campaign is already {campaign.state}.")
        now = timezone.now()
        cancellable = ["pending", "delivered"] + (["confirmed"] if campaign.kind == "secret" else [])
        detail = f"campaign #{campaign.pk} aborted by {actor_label(actor)}" + (f": {reason.strip()}" if reason else "")
        cancelled = 0
        for rotation in CredentialRotation.objects.filter(campaign=campaign, state__in=cancellable).order_by("pk"):
            try:
                rotation_cancel(actor=actor, rotation=rotation, reason=detail[:2000])
                cancelled += 1
            except ValidationError:  # it moved on meanwhile (switched): it carries on
                continue
        campaign.waves.filter(state__in=[RotationWave.State.PENDING, RotationWave.State.RUNNING]).update(
            state=RotationWave.State.ABORTED, finished_at=now
        )
        campaign.state = RotationCampaign.State.ABORTED
        campaign.finished_at = now
        campaign.pause_reason = detail[:MAX_REASON]
        campaign.save(update_fields=["state", "finished_at", "pause_reason", "updated"])
        audit_record(
            actor=actor,
            action="rotation_campaign.abort",
            object_type="rotationcampaign",
            object_id=str(campaign.pk),
            after={"reason": reason, "cancelled_rotations": cancelled},
        )
    return campaign


def campaign_act(*, actor, campaign: RotationCampaign, action: str, reason: str = "") -> RotationCampaign:
    """The operator's buttons (page and API alike): pause, resume or abort."""
    if action == "pause":
        return campaign_pause(actor=actor, campaign=campaign, reason=reason)
    if action == "resume":
        return campaign_resume(actor=actor, campaign=campaign)
    if action == "abort":
        return campaign_abort(actor=actor, campaign=campaign, reason=reason)
    raise ValidationError(f"Unknown campaign action {action!r}: pause, resume or abort.")


def campaign_resume_stalled(*, older_than_seconds: int | None = None) -> int:
    """For the periodic job: a pending or running campaign whose row has not moved (its task was lost with a worker
    or with Redis) is enqueued again. Safe if the old chain is alive after all: each step is idempotent."""
    older = settings.ROTATION_CAMPAIGN_STALLED_SECONDS if older_than_seconds is None else older_than_seconds
    cutoff = timezone.now() - timedelta(seconds=older)
    stalled = list(
        RotationCampaign.objects.filter(
            state__in=[RotationCampaign.State.PENDING, RotationCampaign.State.RUNNING], updated__lte=cutoff
        ).values_list("pk", flat=True)
    )
    for campaign_id in stalled:
        enqueue(campaign_id)
    return len(stalled)
