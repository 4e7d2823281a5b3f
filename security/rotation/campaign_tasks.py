"""Rotation campaign tasks (issue 7, "Campaigns"). Thin: take ids, call the campaign service.

``security.rotation_campaign_advance`` runs one step and queues the next one itself while the campaign runs (every
ROTATION_CAMPAIGN_POLL_SECONDS). Each step is idempotent and decided from the database, so ``acks_late`` is safe and
a worker that dies mid-campaign loses nothing: the message is redelivered, or the periodic job
(``rotation_campaigns_tick``) finds the campaign stalled and queues it again."""

import logging

from celery import shared_task
from django.db import OperationalError

from security.audit import audit_context

logger = logging.getLogger(__name__)


@shared_task(
    name="security.rotation_campaign_advance",
    acks_late=True,
    autoretry_for=(OperationalError,),
    retry_backoff=True,
    retry_jitter=True,
    max_retries=5,
)
def rotation_campaign_advance(campaign_id: int) -> str:
    from security.rotation import campaigns

    delay = campaigns.campaign_advance(campaign_id=campaign_id)
    if delay is None:
        return "idle"
    campaigns.enqueue(campaign_id, countdown=delay)
    return f"next step in {delay:g} s"


@shared_task(name="security.rotation_campaigns_tick", acks_late=True, max_retries=3, autoretry_for=(OperationalError,))
def rotation_campaigns_tick() -> dict:
    """Periodic: resume stalled campaigns; revoke the old certificates whose grace has ended."""
    from security.rotation import campaigns, certificates

    with audit_context(service=campaigns.SERVICE):
        resumed = campaigns.campaign_resume_stalled()
    finished = certificates.certificate_rotations_finish()
    return {"campaigns_resumed": resumed, "certificate_rotations_completed": finished}


def rotation_campaigns_tick_safely() -> dict:
    """For another periodic job (the broker reconcile, every minute) to run this tick too without ever failing
    because of it."""
    try:
        return rotation_campaigns_tick()
    except Exception:
        logger.exception("the rotation campaign tick failed; the next run retries")
        return {"error": True}


@shared_task(
    name="security.rotation_certificate_send",
    bind=True,
    max_retries=5,
    retry_backoff=True,
    retry_jitter=True,
)
def rotation_certificate_send(self, rotation_id: int) -> str:
    """The signed certificate of a rotation, to its device (after the CSR was signed)."""
    from security.rotation import certificates
    from security.rotation.commander import CommanderUnavailable

    try:
        return certificates.certificate_send(rotation_id=rotation_id)
    except CommanderUnavailable as exc:
        raise self.retry(exc=exc) from exc
