"""Rotation tasks (imported by security/tasks.py so the worker registers them). Thin: ids in, a service call out.

All are idempotent: each service takes only rows still in the state it moves them from, under a row lock, so a task
redelivered after a worker crash (acks_late) finishes the batch without rotating anyone twice.
"""

from __future__ import annotations

from celery import shared_task
from django.db import OperationalError

from security.audit import audit_context

from . import commander, services

# Deliveries retry while the broker or the publishing lock is unavailable (bounded); the tick resumes after that.
DELIVERY = {
    "acks_late": True,
    "autoretry_for": (commander.CommanderUnavailable, OperationalError),
    "retry_backoff": True,
    "retry_backoff_max": 60,
    "retry_jitter": True,
    "max_retries": 6,
}


@shared_task(name="security.rotation_deliver", **DELIVERY)
def rotation_deliver(rotation_ids: list[int]) -> dict:
    """First delivery of new secrets (or certificate renewals) to a chunk of devices."""
    with audit_context(service="rotation"):
        return services.rotation_deliver(rotation_ids=rotation_ids)


@shared_task(name="security.rotation_deliver_resend", **DELIVERY)
def rotation_deliver_resend(rotation_ids: list[int]) -> dict:
    """Send again (a fresh secret, a new command id) to devices that came back or never answered."""
    with audit_context(service="rotation"):
        return services.rotation_deliver(rotation_ids=rotation_ids, resend=True)


@shared_task(
    name="security.rotation_switch",
    acks_late=True,
    autoretry_for=(OperationalError,),
    retry_backoff=True,
    retry_jitter=True,
    max_retries=6,
)
def rotation_switch(rotation_ids: list[int]) -> dict:
    """Switch the broker to confirmed secrets; what the per-policy rate limit defers runs again next minute."""
    with audit_context(service="rotation"):
        result = services.rotation_switch(rotation_ids=rotation_ids)
    if result["deferred"]:
        rotation_switch.apply_async(args=[result["deferred"]], countdown=services.seconds_to_next_minute())
    return {k: (len(v) if isinstance(v, list) else v) for k, v in result.items()}


@shared_task(name="security.rotation_tick", autoretry_for=(OperationalError,), max_retries=3)
def rotation_tick() -> dict:
    """Every ROTATION_TICK_SECONDS (a django-celery-beat entry): completions, deadlines, re-sends, resumes; then the
    campaigns' tick (stalled campaigns resumed, old certificates past their grace revoked)."""
    from .campaign_tasks import rotation_campaigns_tick_safely

    outcome = services.rotation_tick()
    outcome["campaigns"] = rotation_campaigns_tick_safely()
    return outcome


@shared_task(name="security.rotation_policy_run", autoretry_for=(OperationalError,), max_retries=3)
def rotation_policy_run(policy_id: int) -> int:
    """A policy's schedule: start rotations for the devices it governs whose credential is older than its limit."""
    from . import policies

    with audit_context(service="rotation-schedule"):
        return policies.rotation_policy_run(policy_id=policy_id)
