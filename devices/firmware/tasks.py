"""Firmware registry tasks (registered with the worker through security/tasks.py). Thin: ids in, a service out."""

from __future__ import annotations

from celery import shared_task
from django.db import OperationalError

from security.audit import audit_context
from security.rotation.commander import CommanderUnavailable

from . import detection, services


@shared_task(
    name="security.firmware_offer_deliver",
    acks_late=True,  # idempotent: only rows still pending are sent
    autoretry_for=(CommanderUnavailable, OperationalError),
    retry_backoff=True,
    retry_backoff_max=60,
    retry_jitter=True,
    max_retries=6,
)
def firmware_offer_deliver(offer_ids: list[int]) -> dict:
    with audit_context(service="firmware-registry"):
        return services.firmware_offer_deliver(offer_ids=offer_ids)


@shared_task(name="security.firmware_model_check", autoretry_for=(OperationalError,), max_retries=3)
def firmware_model_check(model_id: int) -> dict:
    with audit_context(service="detection"):
        return detection.firmware_model_check(model_id=model_id)
