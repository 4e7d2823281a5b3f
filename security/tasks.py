"""Broker enforcement tasks. Thin: take ids, call a service. Both are idempotent (they converge on the desired
policy), so a redelivery after a worker crash is safe."""

import redis
from celery import shared_task
from django.conf import settings
from django.db import OperationalError

from devices.firmware.tasks import firmware_model_check, firmware_offer_deliver  # noqa: F401  (firmware registry)

from . import revocation, revocation_sessions, services
from .audit import audit_context
from .brokers.base import BrokerUnavailable
from .rotation.campaign_tasks import rotation_campaign_advance  # noqa: F401
from .rotation.tasks import (  # noqa: F401  (credential rotation, issue 7: registered with the worker here)
    rotation_deliver,
    rotation_deliver_resend,
    rotation_policy_run,
    rotation_switch,
    rotation_tick,
)


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
    if result is not None and not (result.probe and result.probe.ok):
        raise services.ProbeFailed(result.probe.error if result.probe else "no probe result")
    # Revocation and quarantine: prove from the broker's side what was applied (docs/revocation.md).
    revocation.verify_after_apply()
    return "nothing to do (already applied)" if result is None else "applied"


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
        revocation.bulk_action_resume_stalled()
    revocation.verify_after_apply()
    revocation_sessions.purge_resume()  # verified revocations whose session purge is still pending
    return {
        "drift": sorted(outcome.get("drift", {})),
        "repaired": outcome.get("repaired"),
        "error": outcome.get("error", ""),
    }


def reconcile_broker_soon(trigger: str) -> None:
    """A broker just (re)started: apply and verify what changed while it was down. Through Celery when its Redis
    answers (the worker retries), otherwise here and now (a stack without a worker). Raises what an inline
    reconcile raises."""
    try:
        redis.Redis.from_url(settings.CELERY_BROKER_URL, socket_connect_timeout=1).ping()
    except redis.RedisError:
        with audit_context(service="broker-start"):
            services.broker_reconcile(trigger=trigger)
        return
    reconcile_broker.delay(trigger=trigger)


@shared_task(
    name="security.purge_revoked_sessions",
    autoretry_for=(BrokerUnavailable, services.BrokerBusy),
    retry_backoff=True,
    retry_backoff_max=60,
    retry_jitter=True,
    max_retries=settings.MQTT_APPLY_MAX_RETRIES,
    acks_late=True,
)
def purge_revoked_sessions() -> dict:
    """Discard verified-revoked devices' persistent sessions and retained messages (docs/revocation.md, "Purge").
    Waits for a quiet broker by re-queueing itself; the pending state is on the DeviceAction, so the reconcile job
    queues it again if this task is lost. Idempotent."""
    revocation_sessions.purge_task_started()
    with audit_context(service="revocation-purge"):
        outcome = revocation_sessions.revoked_sessions_purge()
    if outcome.get("deferred"):
        revocation_sessions.purge_enqueue(countdown=outcome["deferred"])
    elif outcome.get("more"):
        revocation_sessions.purge_enqueue(countdown=0)
    return outcome


@shared_task(name="security.run_bulk_action", acks_late=True, max_retries=5, autoretry_for=(OperationalError,))
def run_bulk_action(bulk_id: int) -> str:
    """One chunk per run, then the next run is queued: the apply tasks of earlier chunks run in between (each chunk
    is one outbox row, so one reload at most), and progress shows while it runs. Idempotent (acks_late is safe)."""
    more = revocation.bulk_action_run_chunk(bulk_id=bulk_id)
    if more:
        run_bulk_action.delay(bulk_id)
        return "chunk done, more queued"
    return "done"


# --- detection: notifications, the automatic response, the silence check -----------------------------------


@shared_task(
    name="security.notify_alert",
    bind=True,
    max_retries=settings.DETECTION_NOTIFY_MAX_RETRIES,
)
def notify_alert(self, alert_id: int, channels: list[str] | None = None) -> dict:
    """Email and webhook for one alert. A channel that failed is retried alone (with backoff), so a slow webhook
    never resends the email."""
    from security.detection import notify
    from security.models import Alert

    alert = Alert.objects.filter(pk=alert_id).first()
    if alert is None:
        return {}
    channels = notify.channels_for(alert) if channels is None else channels
    outcome, failed = {}, []
    for channel in channels:
        try:
            if channel == "email":
                notify.send_email(alert)
                outcome["email"] = "sent"
            else:
                outcome["webhook"] = notify.send_webhook(alert)
        except (notify.WebhookFailed, OSError) as exc:
            outcome[channel] = f"failed: {exc}"
            failed.append(channel)
    if outcome:
        notifications = {**(alert.response.get("notifications") or {}), **{k: str(v) for k, v in outcome.items()}}
        Alert.objects.filter(pk=alert.pk).update(response={**alert.response, "notifications": notifications})
    if failed:
        raise self.retry(
            args=(alert_id, failed), countdown=min(300, 2 ** (self.request.retries + 1)), max_retries=self.max_retries
        )
    return outcome


@shared_task(name="security.alert_respond", acks_late=True)
def alert_respond(alert_id: int) -> str:
    """The optional automatic response (quarantine on a critical alert, per DETECTION_AUTO_QUARANTINE_KINDS)."""
    from security.detection.alerts import alert_auto_respond

    with audit_context(service="detection-response"):
        return alert_auto_respond(alert_id=alert_id)


@shared_task(name="security.detect_silent_devices")
def detect_silent_devices() -> int:
    """Devices that reported before and have been silent past DETECTION_SILENCE_SECONDS."""
    from security.detection.periodic import silent_devices_check

    with audit_context(service="detection"):
        return silent_devices_check()


# --- posture audit (docs/posture.md) ----------------------------------------------------------------------------------


@shared_task(
    name="security.posture_audit",
    soft_time_limit=settings.POSTURE_TIMEOUT_SECONDS + 30,
    time_limit=settings.POSTURE_TIMEOUT_SECONDS + 60,
    max_retries=0,
)
def posture_audit(report_id: int | None = None) -> dict:
    """Run one posture audit of the console's broker. Without an id (the daily schedule) a report row is made first.
    Bounded: the checks stop at POSTURE_TIMEOUT_SECONDS; progress is on the report row while it runs."""
    from security.models import PostureReport
    from security.posture import services as posture

    with audit_context(service="posture-audit"):
        if report_id is None:
            report, _created = posture.posture_request(
                actor=None, trigger=PostureReport.Trigger.SCHEDULE, enqueue=False
            )
            if report.state != PostureReport.State.QUEUED:
                return {"report": report.pk, "state": report.state}
            report_id = report.pk
        report = posture.posture_run(report_id=report_id)
    return {"report": report.pk, "state": report.state, "summary": report.summary}
