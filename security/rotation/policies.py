"""Rotation policies and their schedules (docs/rotation.md, "Policies").

Each enabled policy owns one django-celery-beat PeriodicTask (``security.rotation_policy_run`` with the policy id),
which operators see and change in the UI (an interval or a crontab). The fleet default policy and the rotation tick
(``security.rotation_tick``) are created when missing (``rotation_defaults_ensure``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Exists, OuterRef, Q
from django.utils import timezone
from django_celery_beat.models import CrontabSchedule, IntervalSchedule, PeriodicTask

from devices.models import Device
from security.audit import audit_record
from security.models import CredentialRotation, RotationPolicy
from security.services import _authorise

from .services import OPEN_STATES, ROTATABLE_STATUSES, rotation_start_many

POLICY_TASK = "security.rotation_policy_run"
TICK_TASK = "security.rotation_tick"
TICK_NAME = "Credential rotation: deliver, re-send, switch, complete, expire"
FLEET_POLICY_NAME = "Fleet default"
DEFAULT_SCHEDULE = ("interval", 1, IntervalSchedule.HOURS)  # every hour: each run takes up to batch_size devices
POLICY_FIELDS = (
    "name",
    "scope",
    "device_model",
    "group",
    "max_age_days",
    "grace_hours",
    "batch_size",
    "switches_per_minute",
    "on_unconfirmed",
    "enabled",
)
PERIODS = {
    "minutes": IntervalSchedule.MINUTES,
    "hours": IntervalSchedule.HOURS,
    "days": IntervalSchedule.DAYS,
}


@dataclass(frozen=True)
class Schedule:
    """What an operator sets: every N minutes/hours/days, or a crontab line (minute hour day month weekday)."""

    kind: str  # "interval" or "crontab"
    every: int = 1
    period: str = IntervalSchedule.HOURS
    crontab: str = ""

    def label(self) -> str:
        if self.kind == "crontab":
            return f"cron {self.crontab} (UTC)"
        if self.every == 1:
            return f"every {self.period.rstrip('s')}"
        return f"every {self.every} {self.period}"


def schedule_parse(*, kind: str, every: int | None = None, period: str = "", crontab: str = "") -> Schedule:
    """Validate what the form or the API sent; errors name the field."""
    if kind == "crontab":
        parts = (crontab or "").split()
        if len(parts) != 5:
            raise ValidationError({"crontab": ["Write five fields: minute hour day-of-month month day-of-week."]})
        try:
            from celery.schedules import crontab as celery_crontab

            celery_crontab(*[parts[0], parts[1], parts[4], parts[2], parts[3]])
        except (ValueError, TypeError) as exc:
            raise ValidationError({"crontab": [f"Not a valid crontab line: {exc}"]}) from None
        return Schedule(kind="crontab", crontab=" ".join(parts))
    if kind != "interval":
        raise ValidationError({"schedule_kind": ["Choose an interval or a crontab line."]})
    if period not in PERIODS.values():
        raise ValidationError({"period": ["Choose minutes, hours or days."]})
    if not every or every < 1:
        raise ValidationError({"every": ["Give a whole number of at least 1."]})
    if period == IntervalSchedule.MINUTES and every < 5:
        raise ValidationError({"every": ["Run at most every 5 minutes; each run starts up to batch_size rotations."]})
    return Schedule(kind="interval", every=int(every), period=period)


def schedule_of(task: PeriodicTask | None) -> Schedule | None:
    if task is None:
        return None
    if task.crontab_id:
        c = task.crontab
        return Schedule(
            kind="crontab",
            crontab=f"{c.minute} {c.hour} {c.day_of_month} {c.month_of_year} {c.day_of_week}",
        )
    if task.interval_id:
        return Schedule(kind="interval", every=task.interval.every, period=task.interval.period)
    return None


def _task_name(policy: RotationPolicy) -> str:
    return f"Rotate credentials: {policy.name} (policy {policy.pk})"


def _schedule_save(policy: RotationPolicy, schedule: Schedule | None) -> PeriodicTask:
    """Create or update the policy's PeriodicTask (enabled with the policy)."""
    task = policy.periodic_task
    schedule = schedule or schedule_of(task) or Schedule(*DEFAULT_SCHEDULE)
    interval = crontab = None
    if schedule.kind == "crontab":
        minute, hour, day_of_month, month_of_year, day_of_week = schedule.crontab.split()
        crontab, _ = CrontabSchedule.objects.get_or_create(
            minute=minute,
            hour=hour,
            day_of_month=day_of_month,
            month_of_year=month_of_year,
            day_of_week=day_of_week,
            timezone="UTC",
        )
    else:
        interval, _ = IntervalSchedule.objects.get_or_create(every=schedule.every, period=schedule.period)
    values = {
        "name": _task_name(policy),
        "task": POLICY_TASK,
        "kwargs": json.dumps({"policy_id": policy.pk}),
        "interval": interval,
        "crontab": crontab,
        "enabled": policy.enabled,
        "description": f"Starts up to {policy.batch_size} rotations of credentials older than "
        f"{policy.max_age_days} days, for the devices policy {policy.name!r} governs (docs/rotation.md).",
    }
    if task is None:
        task = PeriodicTask.objects.create(**values)
        policy.periodic_task = task
        policy.save(update_fields=["periodic_task", "updated"])
    else:
        for key, value in values.items():
            setattr(task, key, value)
        task.save()
    return task


def rotation_defaults_ensure(*, actor=None, audit: bool = True) -> RotationPolicy:
    """The fleet default policy (with its schedule) and the rotation tick, created when missing. Idempotent. ``actor``:
    whose action made them necessary (the first rotation, the first visit of the policy page), for the audit log.
    ``audit=False`` at install (post_migrate): part of the schema's defaults like the roles, not an operator's act."""
    with transaction.atomic():
        policy = RotationPolicy.objects.filter(scope=RotationPolicy.Scope.FLEET).first()
        if policy is None:
            policy = RotationPolicy.objects.create(name=FLEET_POLICY_NAME, scope=RotationPolicy.Scope.FLEET)
            if audit:
                audit_record(
                    actor=actor or "system", action="rotation_policy.create", target=policy, after=_snapshot(policy)
                )
        if policy.periodic_task_id is None:
            _schedule_save(policy, None)
        if not PeriodicTask.objects.filter(task=TICK_TASK).exists():
            every, _ = IntervalSchedule.objects.get_or_create(
                every=max(5, settings.ROTATION_TICK_SECONDS), period=IntervalSchedule.SECONDS
            )
            PeriodicTask.objects.get_or_create(
                name=TICK_NAME,
                defaults={
                    "task": TICK_TASK,
                    "interval": every,
                    "enabled": True,
                    "description": "Completes proven rotations, fails overdue ones (policy grace), re-sends to devices "
                    "that came back, resumes deliveries and switches a worker left unfinished.",
                },
            )
    return policy


def rotation_defaults_post_migrate(sender=None, **kwargs) -> None:
    """For SecurityConfig.ready (post_migrate): the defaults exist after every migrate and flush."""
    rotation_defaults_ensure(audit=False)


def _snapshot(policy: RotationPolicy) -> dict:
    return {
        "name": policy.name,
        "scope": policy.scope,
        "device_model": policy.device_model_id,
        "group": policy.group_id,
        "max_age_days": policy.max_age_days,
        "grace_hours": policy.grace_hours,
        "batch_size": policy.batch_size,
        "switches_per_minute": policy.switches_per_minute,
        "on_unconfirmed": policy.on_unconfirmed,
        "enabled": policy.enabled,
    }


def _policy_clean(policy: RotationPolicy) -> None:
    errors = {}
    if policy.scope == RotationPolicy.Scope.MODEL and policy.device_model_id is None:
        errors["device_model"] = ["Choose the device model this policy is for."]
    if policy.scope == RotationPolicy.Scope.GROUP and policy.group_id is None:
        errors["group"] = ["Choose the device group this policy is for."]
    if policy.scope != RotationPolicy.Scope.MODEL:
        policy.device_model = None
    if policy.scope != RotationPolicy.Scope.GROUP:
        policy.group = None
    for name in ("max_age_days", "batch_size", "switches_per_minute", "grace_hours"):
        if getattr(policy, name) is not None and getattr(policy, name) < 1:
            errors[name] = ["Give at least 1."]
    if errors:
        raise ValidationError(errors)
    policy.full_clean(exclude=["periodic_task", "created_by"])


def rotation_policy_create(*, actor, data: dict, schedule: Schedule | None = None) -> RotationPolicy:
    _authorise(actor, "security.add_rotationpolicy")
    policy = RotationPolicy(**{k: v for k, v in data.items() if k in POLICY_FIELDS})
    policy.created_by = actor if getattr(actor, "is_authenticated", False) else None
    _policy_clean(policy)
    with transaction.atomic():
        policy.save()
        task = _schedule_save(policy, schedule)
        audit_record(
            actor=actor,
            action="rotation_policy.create",
            target=policy,
            after={**_snapshot(policy), "schedule": schedule_of(task).label()},
        )
    return policy


def rotation_policy_update(*, actor, policy: RotationPolicy, data: dict, schedule: Schedule | None = None):
    _authorise(actor, "security.change_rotationpolicy")
    with transaction.atomic():
        policy = RotationPolicy.objects.select_for_update().get(pk=policy.pk)
        before = {**_snapshot(policy), "schedule": (schedule_of(policy.periodic_task) or Schedule("interval")).label()}
        for key, value in data.items():
            if key in POLICY_FIELDS and key != "scope":  # a policy keeps its scope; make another one instead
                setattr(policy, key, value)
        if policy.scope == RotationPolicy.Scope.FLEET and not policy.enabled:
            pass  # allowed: turning the schedule off is the operator's call, and it is audited
        _policy_clean(policy)
        policy.save()
        task = _schedule_save(policy, schedule)
        after = {**_snapshot(policy), "schedule": schedule_of(task).label()}
        audit_record(
            actor=actor,
            action="rotation_policy.update",
            target=policy,
            before={k: v for k, v in before.items() if before[k] != after.get(k)},
            after={k: v for k, v in after.items() if before.get(k) != v},
        )
    return policy


def rotation_policy_delete(*, actor, policy: RotationPolicy) -> None:
    _authorise(actor, "security.delete_rotationpolicy")
    if policy.scope == RotationPolicy.Scope.FLEET:
        raise ValidationError("The fleet default policy cannot be deleted; disable its schedule instead.")
    with transaction.atomic():
        audit_record(actor=actor, action="rotation_policy.delete", target=policy, before=_snapshot(policy))
        task_id = policy.periodic_task_id
        policy.delete()
        if task_id:
            PeriodicTask.objects.filter(pk=task_id).delete()


# --- which devices a policy governs, and its scheduled run ---------------------------------------------------------


def governed_devices(policy: RotationPolicy):
    """The devices this policy decides for: group policy beats model policy beats the fleet default. A device in
    several groups with policies belongs to the oldest of those group policies."""
    group_policies = RotationPolicy.objects.filter(scope=RotationPolicy.Scope.GROUP)
    in_policy_group = Exists(
        Device.groups.through.objects.filter(
            device_id=OuterRef("pk"), devicegroup_id__in=group_policies.values("group_id")
        )
    )
    devices = Device.objects.all()
    if policy.scope == RotationPolicy.Scope.GROUP:
        older_group = Exists(
            Device.groups.through.objects.filter(
                device_id=OuterRef("pk"),
                devicegroup_id__in=group_policies.filter(pk__lt=policy.pk).values("group_id"),
            )
        )
        return devices.filter(groups=policy.group_id).exclude(older_group)
    if policy.scope == RotationPolicy.Scope.MODEL:
        return devices.filter(model_id=policy.device_model_id).exclude(in_policy_group)
    model_policies = RotationPolicy.objects.filter(scope=RotationPolicy.Scope.MODEL).values("device_model_id")
    return devices.exclude(in_policy_group).exclude(Q(model_id__in=model_policies))


def rotation_policy_due(policy: RotationPolicy):
    """Devices this policy governs whose broker secret is older than max_age_days, oldest first, without an open
    rotation."""
    cutoff = timezone.now() - timedelta(days=policy.max_age_days)
    open_rotation = Exists(CredentialRotation.objects.filter(device=OuterRef("pk"), state__in=OPEN_STATES))
    return (
        governed_devices(policy)
        .filter(status__in=ROTATABLE_STATUSES, credential__issued_at__lt=cutoff)
        .exclude(open_rotation)
        .order_by("credential__issued_at", "pk")
        .distinct()
    )


def rotation_policy_run(*, policy_id: int) -> int:
    """The scheduled run: start rotations for up to batch_size due devices. Runs as a service (audit_context)."""
    policy = RotationPolicy.objects.filter(pk=policy_id).first()
    if policy is None or not policy.enabled:
        return 0
    client_ids = list(rotation_policy_due(policy).values_list("client_id", flat=True)[: policy.batch_size])
    started = rotation_start_many(
        actor=None, client_ids=client_ids, trigger=CredentialRotation.Trigger.SCHEDULE, policy=policy
    )
    audit_record(
        actor=None,
        action="rotation_policy.run",
        target=policy,
        after={"due": len(client_ids), "started": started, "max_age_days": policy.max_age_days},
    )
    return started
