"""Posture audit services: build the target, ask for a run (audited, enqueued after commit), run it with visible
progress, keep the report, raise an alert per failed critical check, and compare a run with the one before.

The console's own broker is audited as a device would see it through the console's **probe identity** (the canary of
security/brokers/files.py), not a throwaway audit identity: the probe is already in the rendered policy with exactly
a device's patterns (plus write on its own command channel, which gives the audit a topic it may write and read), so
the audit changes nothing on the broker: no new password line, no reload, no re-authentication of the fleet. Its
password is derived from the policy files the broker loaded. Because one username is one session
(use_username_as_clientid), every check that connects as the probe holds the broker-apply lock, briefly, so it never
takes over an apply's canary; the canary messages for "another device" come from the commander identity under its
publishing lock. docs/posture.md has the reasoning.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from security.audit import audit_record
from security.models import PostureReport
from security.permissions import require

from .checks import CHECKS
from .context import CRITICAL, FAIL, PASS, Target
from .runner import ORDER, audit_run
from .wire import Identity

log = logging.getLogger(__name__)

ALERT_KIND = "posture_weakness"
SCHEDULE_NAME = "Posture audit (daily)"
TASK_NAME = "security.posture_audit"
STALE_AFTER_SECONDS = 120  # a queued or running report older than this was lost with its worker


# --- targets ----------------------------------------------------------------------------------------------------------


def probe_identity() -> Identity:
    """The console's probe with the password of the generation the broker has loaded (derived from the files on disk,
    as the revocation fast path does); the desired policy's when the files are not the console's rendering."""
    from security.brokers import get_adapter

    username = settings.MQTT_PROBE_USERNAME
    password = ""
    with contextlib.suppress(Exception):  # no files yet, an unreadable directory: the desired policy's password
        password = get_adapter().loaded_probe_password(settings.MQTT_PROBE_PASSWORD)
    if not password:
        from security.services import policy_desired

        password = policy_desired().probe_password
    return Identity("the console's probe identity (a device's grants)", username, password, client_id=username)


def _broker_lock():
    from security.services import broker_lock

    return broker_lock(timeout=settings.POSTURE_CHECK_TIMEOUT_SECONDS)


def _commander_lock():
    from security.rotation.commander import _commander_lock

    return _commander_lock(settings.POSTURE_CHECK_TIMEOUT_SECONDS)


def posture_target_managed() -> Target:
    """The console's own broker, from settings, with the probe and commander identities."""
    ca_file = Path(settings.MQTT_BROKER_DIR) / "ca-chain.pem"
    rx = settings.MQTT_TOPIC_RX_PREFIX
    return Target(
        host=settings.MQTT_HOST,
        port=settings.MQTT_PORT,
        tls_port=settings.MQTT_TLS_PORT if settings.MQTT_TLS_LISTENER else None,
        ca_file=str(ca_file) if settings.MQTT_TLS_LISTENER and ca_file.exists() else None,
        managed=True,
        device=probe_identity,
        device_own_topic=f"{rx}/{settings.MQTT_PROBE_USERNAME}/command",
        publisher=Identity(
            "the console's commander identity",
            settings.MQTT_COMMANDER_USERNAME,
            settings.MQTT_COMMANDER_PASSWORD,
            client_id=settings.MQTT_COMMANDER_USERNAME,
        ),
        device_lock=_broker_lock,
        publisher_lock=_commander_lock,
        rx_prefix=rx,
        tx_prefix=settings.MQTT_TOPIC_TX_PREFIX,
        fleet_prefix=settings.FLEET_CLIENT_ID_PREFIX,
        certificates_expected=settings.MQTT_TLS_LISTENER,
        plain_console_only=not settings.MQTT_PLAIN_LISTENER,
        oversize_bytes=settings.POSTURE_OVERSIZE_BYTES,
        expiry_warning_days=settings.POSTURE_CERT_WARNING_DAYS,
    )


def posture_target_external(
    *,
    host: str,
    port: int | None,
    tls_port: int | None = None,
    ca_file: str | None = None,
    username: str | None = None,
    password: str | None = None,
    own_topic: str = "",
    certificates_expected: bool = False,
) -> Target:
    """Another broker: only what an outsider has (anonymous, guesses), plus a device credential when given."""
    device = None
    if username:
        identity = Identity(f"the given identity {username!r}", username, password or "")
        device = lambda: identity  # noqa: E731
        own_topic = own_topic or f"{settings.MQTT_TOPIC_RX_PREFIX}/{username}/command"
    return Target(
        host=host,
        port=port,
        tls_port=tls_port,
        ca_file=ca_file,
        device=device,
        device_own_topic=own_topic,
        rx_prefix=settings.MQTT_TOPIC_RX_PREFIX,
        tx_prefix=settings.MQTT_TOPIC_TX_PREFIX,
        fleet_prefix=settings.FLEET_CLIENT_ID_PREFIX,
        certificates_expected=certificates_expected,
        oversize_bytes=settings.POSTURE_OVERSIZE_BYTES,
        expiry_warning_days=settings.POSTURE_CERT_WARNING_DAYS,
    )


# --- running ----------------------------------------------------------------------------------------------------------


def posture_request(
    *, actor, trigger: str = PostureReport.Trigger.UI, enqueue: bool = True
) -> tuple[PostureReport, bool]:
    """Queue a run of the console's broker audit. One at a time: while a run is queued or running (and not stale),
    that one is returned instead (``created`` False). ``actor=None``: the schedule, whose task runs the report itself
    (``enqueue=False``)."""
    from security.tasks import posture_audit

    if actor is not None:
        require(actor, "security.run_posture_audit")
    fresh = timezone.now() - timezone.timedelta(seconds=STALE_AFTER_SECONDS)
    with transaction.atomic():
        # A run no worker finished (the worker died, or the queue was lost) says so in the history.
        PostureReport.objects.filter(
            state__in=[PostureReport.State.QUEUED, PostureReport.State.RUNNING], created__lt=fresh
        ).update(
            state=PostureReport.State.FAILED,
            finished=timezone.now(),
            error=f"No worker finished this run within {STALE_AFTER_SECONDS} s (a worker died or the queue was lost).",
        )
        busy = (
            PostureReport.objects.select_for_update()
            .filter(state__in=[PostureReport.State.QUEUED, PostureReport.State.RUNNING], created__gte=fresh)
            .first()
        )
        if busy is not None:
            return busy, False
        report = PostureReport.objects.create(
            trigger=trigger,
            actor=actor if getattr(actor, "is_authenticated", False) else None,
            actor_label=actor.get_username() if getattr(actor, "is_authenticated", False) else "service:posture-audit",
            target={"host": settings.MQTT_HOST, "port": settings.MQTT_PORT, "managed": True},
            progress={"done": 0, "total": len(ORDER), "current": ""},
        )
        audit_record(
            actor=actor,
            action="posture.run_requested",
            target=report,
            object_id=str(report.pk),
            after={"trigger": trigger},
        )
        if enqueue:
            transaction.on_commit(lambda: posture_audit.delay(report.pk))
    return report, True


def posture_run(*, report_id: int, target: Target | None = None) -> PostureReport:
    """Run the audit for a queued report, saving progress as each check starts; then the findings, the summary and
    the alerts. Idempotent for a finished report (returned as it is)."""
    report = PostureReport.objects.get(pk=report_id)
    if report.state in (PostureReport.State.DONE, PostureReport.State.FAILED):
        return report
    target = target or posture_target_managed()
    report.state = PostureReport.State.RUNNING
    report.started = timezone.now()
    report.target = target.describe()
    report.save(update_fields=["state", "started", "target"])

    def progress(done: int, total: int, current: str) -> None:
        PostureReport.objects.filter(pk=report.pk).update(
            progress={"done": done, "total": total, "current": current, "title": _title(current)}
        )

    try:
        result = audit_run(
            target,
            total_timeout=settings.POSTURE_TIMEOUT_SECONDS,
            check_timeout=settings.POSTURE_CHECK_TIMEOUT_SECONDS,
            progress=progress,
        )
    except Exception as exc:  # the runner reports per check; this is a bug or a broken target description
        log.exception("posture audit %s failed", report.pk)
        PostureReport.objects.filter(pk=report.pk).update(
            state=PostureReport.State.FAILED, finished=timezone.now(), error=f"{type(exc).__name__}: {exc}"[:2000]
        )
        report.refresh_from_db()
        return report
    report.findings = [f.as_dict() for f in result.findings]
    report.summary = result.summary()
    report.duration_ms = result.duration_ms
    report.finished = timezone.now()
    report.state = PostureReport.State.DONE
    report.progress = {"done": len(result.findings), "total": len(result.findings), "current": ""}
    report.save()
    audit_record(
        actor=None,
        action="posture.completed",
        target=report,
        object_id=str(report.pk),
        after={"summary": report.summary, "failed": [f["id"] for f in report.findings if f["status"] == FAIL]},
    )
    if target.managed:  # another broker's weaknesses are not this fleet's alerts
        try:
            _raise_alerts(report)
        except Exception:  # noqa: BLE001 - the report is saved; an alert that could not be queued is logged
            log.exception("posture audit %s: could not raise or notify its alerts", report.pk)
    return report


def posture_run_now(*, target: Target, trigger: str = PostureReport.Trigger.COMMAND, actor_label: str) -> PostureReport:
    """Run in this process (the management command), recorded like any other run."""
    report = PostureReport.objects.create(trigger=trigger, actor_label=actor_label[:150], target=target.describe())
    return posture_run(report_id=report.pk, target=target)


def _title(check_id: str) -> str:
    spec = CHECKS.get(check_id)
    return spec.title if spec else ""


def _raise_alerts(report: PostureReport) -> None:
    """A failed critical check is an alert, one per check (the dedup key is the check id), so a weakness found every
    day stays one open alert with its occurrences counted."""
    from security.detection.alerts import alert_raise

    for finding in report.findings:
        if finding["status"] == FAIL and finding["severity"] == CRITICAL:
            alert_raise(
                kind=ALERT_KIND,
                subject=finding["id"],
                summary=f"Posture audit: {finding['title']}",
                severity=CRITICAL,
                evidence={
                    "report": report.pk,
                    "target": report.target,
                    "check": finding["id"],
                    "evidence": finding["evidence"],
                    "fix": finding["fix"],
                },
            )


# --- reading ----------------------------------------------------------------------------------------------------------


def posture_latest() -> PostureReport | None:
    return PostureReport.objects.filter(state=PostureReport.State.DONE).select_related("actor").first()


def posture_history(limit: int = 30) -> list[PostureReport]:
    return list(PostureReport.objects.select_related("actor").order_by("-created", "-id")[:limit])


def posture_previous(report: PostureReport) -> PostureReport | None:
    return (
        PostureReport.objects.filter(state=PostureReport.State.DONE, created__lt=report.created)
        .exclude(pk=report.pk)
        .order_by("-created", "-id")
        .first()
    )


def posture_changes(report: PostureReport, previous: PostureReport | None) -> list[dict]:
    """What changed since the previous run: checks whose status moved (new failures first)."""
    if previous is None:
        return []
    before = {f["id"]: f["status"] for f in previous.findings}
    changes = []
    for finding in report.findings:
        old = before.get(finding["id"])
        if old != finding["status"]:
            changes.append(
                {
                    "id": finding["id"],
                    "title": finding["title"],
                    "severity": finding["severity"],
                    "before": old or "not run",
                    "after": finding["status"],
                    "worse": finding["status"] == FAIL,
                }
            )
    changes.sort(key=lambda c: (not c["worse"], c["id"]))
    return changes


def findings_by_severity(report: PostureReport) -> list[tuple[str, list[dict]]]:
    """Failures first, by severity; then unknowns; then passes."""
    from .context import SEVERITIES

    groups: list[tuple[str, list[dict]]] = []
    for severity in SEVERITIES:
        failed = [f for f in report.findings if f["status"] == FAIL and f["severity"] == severity]
        if failed:
            groups.append((f"failed: {severity}", failed))
    unknown = [f for f in report.findings if f["status"] not in (FAIL, PASS)]
    if unknown:
        groups.append(("could not tell", unknown))
    passed = [f for f in report.findings if f["status"] == PASS]
    if passed:
        groups.append(("passed", passed))
    return groups


# --- the schedule -----------------------------------------------------------------------------------------------------


def posture_schedule_ensure(sender=None, **kwargs) -> None:
    """The daily schedule exists after every migrate and flush (post_migrate, like the rotation tick); an operator
    may change or disable it on the schedules admin, and it is not re-created while it exists."""
    from django.db import connections
    from django_celery_beat.models import IntervalSchedule, PeriodicTask

    connection = connections[kwargs.get("using") or "default"]
    tables = connection.introspection.table_names()
    if "security_posturereport" not in tables or "django_celery_beat_periodictask" not in tables:
        return
    if PeriodicTask.objects.filter(task=TASK_NAME).exists():
        return
    every, _ = IntervalSchedule.objects.get_or_create(
        every=max(1, settings.POSTURE_SCHEDULE_HOURS), period=IntervalSchedule.HOURS
    )
    PeriodicTask.objects.get_or_create(
        name=SCHEDULE_NAME,
        defaults={
            "task": TASK_NAME,
            "interval": every,
            "enabled": True,
            "description": "Probes the console's broker the way an attacker would and records what is weak "
            "(docs/posture.md).",
        },
    )
