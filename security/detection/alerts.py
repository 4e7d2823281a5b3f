"""Alert services: raise (deduplicated), acknowledge, resolve. Every state change is audited.

Raising is called by the consumer, the broker-log monitor, periodic tasks and the reconcile job, all as services
(inside ``audit_context(service=...)``). An event whose kind and subject match an open or acknowledged alert
updates that alert (occurrences, last_seen, merged evidence) rather than adding a row; only the creation of an
alert (and a severity increase) is written to the audit log and notified, so a flood of events is one alert.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from devices.models import Device
from security.audit import audit_record
from security.models import SEVERITY_RANK, Alert
from security.permissions import require

log = logging.getLogger(__name__)

MAX_SAMPLES = 20  # evidence samples kept per alert (the newest)


@dataclass(frozen=True)
class AlertSpec:
    """One kind of alert: its default severity and what it means, for the UI and docs."""

    kind: str
    severity: str
    title: str


KINDS: dict[str, AlertSpec] = {
    spec.kind: spec
    for spec in (
        AlertSpec("auth_failures", Alert.Severity.LOW, "Failed logins from one address (high when they burst)"),
        AlertSpec("auth_spraying", Alert.Severity.HIGH, "Password spraying: failed logins from many addresses"),
        AlertSpec("subscription_violation", Alert.Severity.HIGH, "Subscription outside the device's own topics"),
        AlertSpec("client_id_conflict", Alert.Severity.HIGH, "Two connections fighting over one client id"),
        AlertSpec("oversize_packet", Alert.Severity.MEDIUM, "Packet over the broker's size limit"),
        AlertSpec("publish_denied", Alert.Severity.HIGH, "ACL violation: publish outside the device's own topics"),
        AlertSpec("rate_anomaly", Alert.Severity.MEDIUM, "Message rate far above the device's baseline"),
        AlertSpec("size_anomaly", Alert.Severity.MEDIUM, "Message size far above the device's baseline"),
        AlertSpec("value_out_of_range", Alert.Severity.LOW, "Telemetry reading outside its learned range"),
        AlertSpec("malformed_messages", Alert.Severity.LOW, "Malformed messages from a device"),
        AlertSpec("device_silent", Alert.Severity.MEDIUM, "Device silent past its expected interval"),
        AlertSpec("unknown_client", Alert.Severity.HIGH, "Connection from an unknown client id with the fleet prefix"),
        AlertSpec(
            "unknown_credential", Alert.Severity.CRITICAL, "A credential on the broker the console did not issue"
        ),
        AlertSpec("fingerprint_changed", Alert.Severity.LOW, "The device connects differently than before"),
        AlertSpec("credential_cloned", Alert.Severity.CRITICAL, "Two connection fingerprints alternating on one id"),
        AlertSpec("firmware_outdated", Alert.Severity.LOW, "Firmware older than the model's latest release"),
        # Firmware registry (docs/firmware.md): below the minimum secure version or on a known-vulnerable release is
        # critical; a withdrawn release is a medium.
        AlertSpec(
            "firmware_below_minimum", Alert.Severity.CRITICAL, "Firmware below the model's minimum secure version"
        ),
        AlertSpec("firmware_vulnerable", Alert.Severity.CRITICAL, "Firmware release marked known-vulnerable"),
        AlertSpec("firmware_withdrawn", Alert.Severity.MEDIUM, "Firmware release withdrawn from the registry"),
        # Credential rotation (docs/rotation.md).
        AlertSpec("rotation_unconfirmed", Alert.Severity.MEDIUM, "Credential rotation not confirmed within its grace"),
        AlertSpec("rotation_rejected", Alert.Severity.MEDIUM, "Device refused its new credential"),
        AlertSpec("rotation_unproven", Alert.Severity.HIGH, "No reconnect after the broker switched to the new secret"),
        # Posture audit (docs/posture.md): one alert per failed critical check.
        AlertSpec("posture_weakness", Alert.Severity.CRITICAL, "Posture audit: a critical check failed on the broker"),
        # Payload encryption (docs/detection.md, "Payload encryption").
        AlertSpec("payload_tampered", Alert.Severity.HIGH, "Sealed payload that does not open (tampered, wrong key)"),
        AlertSpec("payload_replayed", Alert.Severity.HIGH, "Sealed payload replayed (counter seen before)"),
        AlertSpec("payload_unencrypted", Alert.Severity.MEDIUM, "Clear-text payload from a device that must seal"),
        AlertSpec(
            "rotation_fallback",
            Alert.Severity.HIGH,
            "Device back on its previous secret: the broker refused the new one after the switch",
        ),
    )
}


def _merge_evidence(current: dict, new: dict) -> dict:
    """Counts add up, samples keep the newest MAX_SAMPLES, everything else is the latest value."""
    merged = dict(current or {})
    for key, value in (new or {}).items():
        if key == "counts" and isinstance(value, dict):
            counts = dict(merged.get("counts") or {})
            for name, n in value.items():
                if isinstance(n, int | float) and isinstance(counts.get(name, 0), int | float):
                    counts[name] = counts.get(name, 0) + n
                else:
                    counts[name] = n
            merged["counts"] = counts
        elif key == "samples" and isinstance(value, list):
            merged["samples"] = (list(merged.get("samples") or []) + value)[-MAX_SAMPLES:]
        else:
            merged[key] = value
    return merged


def alert_raise(
    *,
    kind: str,
    subject: str,
    summary: str,
    evidence: dict | None = None,
    severity: str | None = None,
    device: Device | None = None,
    client_id: str = "",
    occurrences: int = 1,
    at: datetime | None = None,
) -> tuple[Alert, bool]:
    """Open an alert, or update the open one with the same kind and subject. Returns (alert, created)."""
    if kind not in KINDS:
        raise ValueError(f"unknown alert kind {kind!r}")
    severity = severity or KINDS[kind].severity
    if severity not in SEVERITY_RANK:
        raise ValueError(f"unknown severity {severity!r}")
    at = at or timezone.now()
    client_id = client_id or (device.client_id if device else "")
    dedup_key = f"{kind}:{subject}"[:320]
    evidence = evidence or {}
    for attempt in range(3):
        try:
            with transaction.atomic():
                alert = (
                    Alert.objects.select_for_update()
                    .filter(dedup_key=dedup_key)
                    .exclude(state=Alert.State.RESOLVED)
                    .first()
                )
                if alert is not None:
                    escalated = SEVERITY_RANK[severity] > SEVERITY_RANK[alert.severity]
                    alert.occurrences += max(occurrences, 1)
                    alert.last_seen = max(alert.last_seen, at)
                    alert.evidence = _merge_evidence(alert.evidence, evidence)
                    alert.summary = summary[:255]
                    if device is not None and alert.device_id is None:
                        alert.device = device
                    fields = ["occurrences", "last_seen", "evidence", "summary", "device"]
                    if escalated:
                        before = {"severity": alert.severity}
                        alert.severity = severity
                        fields.append("severity")
                        audit_record(
                            actor=None,
                            action="alert.escalated",
                            target=alert,
                            object_id=str(alert.pk),
                            before=before,
                            after={"severity": severity},
                        )
                        _after_commit(alert.pk)
                    alert.save(update_fields=fields)
                    return alert, False
                alert = Alert.objects.create(
                    kind=kind,
                    severity=severity,
                    device=device,
                    client_id=client_id[:128],
                    subject=subject[:255],
                    dedup_key=dedup_key,
                    summary=summary[:255],
                    evidence=_merge_evidence({}, evidence),
                    first_seen=at,
                    last_seen=at,
                    occurrences=max(occurrences, 1),
                )
                audit_record(
                    actor=None,
                    action="alert.raised",
                    target=alert,
                    object_id=str(alert.pk),
                    after={"kind": kind, "severity": severity, "client_id": client_id, "subject": subject},
                )
                _after_commit(alert.pk)
                return alert, True
        except IntegrityError:
            # Another worker opened the same alert at the same moment: update theirs.
            if attempt == 2:
                raise
    raise RuntimeError("unreachable")


def _after_commit(alert_id: int) -> None:
    from security.tasks import alert_respond, notify_alert

    transaction.on_commit(lambda: notify_alert.delay(alert_id))
    if settings.DETECTION_AUTO_QUARANTINE_KINDS:
        transaction.on_commit(lambda: alert_respond.delay(alert_id))


def _state_change(*, actor, alert: Alert, target: str, comment: str) -> Alert:
    require(actor, "security.change_alert")
    comment = (comment or "").strip()
    with transaction.atomic():
        alert = Alert.objects.select_for_update().get(pk=alert.pk)
        allowed = {
            Alert.State.ACKNOWLEDGED: (Alert.State.OPEN,),
            Alert.State.RESOLVED: (Alert.State.OPEN, Alert.State.ACKNOWLEDGED),
        }[target]
        if alert.state not in allowed:
            raise ValidationError(
                f"This alert is {alert.get_state_display().lower()}; it cannot be "
                f"{'acknowledged' if target == Alert.State.ACKNOWLEDGED else 'resolved'} from that state."
            )
        before = {"state": alert.state}
        now = timezone.now()
        alert.state = target
        if target == Alert.State.ACKNOWLEDGED:
            alert.acknowledged_by, alert.acknowledged_at, alert.acknowledge_comment = actor, now, comment
            fields = ["state", "acknowledged_by", "acknowledged_at", "acknowledge_comment"]
        else:
            alert.resolved_by, alert.resolved_at, alert.resolve_comment = actor, now, comment
            fields = ["state", "resolved_by", "resolved_at", "resolve_comment"]
        alert.save(update_fields=fields)
        audit_record(
            actor=actor,
            action=f"alert.{'acknowledged' if target == Alert.State.ACKNOWLEDGED else 'resolved'}",
            target=alert,
            object_id=str(alert.pk),
            before=before,
            after={"state": target, "comment": comment},
        )
    return alert


def alert_acknowledge(*, actor, alert: Alert, comment: str = "") -> Alert:
    """Someone is on it: the alert stays open for new events (they still update it)."""
    return _state_change(actor=actor, alert=alert, target=Alert.State.ACKNOWLEDGED, comment=comment)


def alert_resolve(*, actor, alert: Alert, comment: str = "") -> Alert:
    """Done: the next event of this kind and subject opens a new alert."""
    return _state_change(actor=actor, alert=alert, target=Alert.State.RESOLVED, comment=comment)


def alert_auto_respond(*, alert_id: int) -> str:
    """The optional automatic response: quarantine the device of a critical alert whose kind is listed in
    DETECTION_AUTO_QUARANTINE_KINDS. Runs as a service (audited as such); recorded on the alert."""
    from security.revocation import device_action_request

    alert = Alert.objects.select_related("device").get(pk=alert_id)
    if alert.kind not in settings.DETECTION_AUTO_QUARANTINE_KINDS or alert.severity != Alert.Severity.CRITICAL:
        return "not configured for this alert"
    if alert.device is None:
        return "no device to quarantine"
    if alert.device.status != Device.Status.ACTIVE:
        return f"device is {alert.device.status}"
    # The same path as a person's one click: a DeviceAction that the verifier proves and the session purge follows.
    device_action_request(
        actor=None,
        device=alert.device,
        action="quarantine",
        reason=f"automatic response to alert #{alert.pk} ({alert.kind})",
        alert_id=alert.pk,
    )
    Alert.objects.filter(pk=alert.pk).update(
        response={**alert.response, "quarantined_at": timezone.now().isoformat(), "action": "quarantine"}
    )
    audit_record(
        actor=None,
        action="alert.auto_response",
        target=alert,
        object_id=str(alert.pk),
        after={"action": "quarantine", "client_id": alert.device.client_id},
    )
    return "quarantined"
