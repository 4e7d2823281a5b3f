"""Broker enforcement tasks. Thin: take ids, call a service. Both are idempotent (they converge on the desired
policy), so a redelivery after a worker crash is safe."""

from celery import shared_task
from django.conf import settings

from . import services
from .audit import audit_context
from .brokers.base import BrokerUnavailable


@shared_task(
    name="security.apply_enforcement",
    autoretry_for=(BrokerUnavailable, services.BrokerBusy, services.ProbeFailed),
    retry_backoff=True,
    retry_backoff_max=60,
    retry_jitter=True,
    max_retries=settings.MQTT_APPLY_MAX_RETRIES,
    acks_late=True,
)
def apply_enforcement(change_id: int) -> str:
    """Apply every pending enforcement change (coalesced). After the retries the rows stay pending: the
    reconcile job applies them when the broker is back."""
    with audit_context(service="broker"):
        result = services.enforcement_apply(change_id=change_id)
    if result is None:
        return "nothing to do (already applied)"
    if not (result.probe and result.probe.ok):
        raise services.ProbeFailed(result.probe.error if result.probe else "no probe result")
    return "applied"


@shared_task(
    name="security.reconcile_broker",
    autoretry_for=(services.BrokerBusy,),
    retry_backoff=True,
    retry_jitter=True,
    max_retries=3,
    acks_late=True,
)
def reconcile_broker(trigger: str = "schedule") -> dict:
    with audit_context(service="broker-reconcile"):
        outcome = services.broker_reconcile(trigger=trigger)
    return {
        "drift": sorted(outcome.get("drift", {})),
        "repaired": outcome.get("repaired"),
        "error": outcome.get("error", ""),
    }
