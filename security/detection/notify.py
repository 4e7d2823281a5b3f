"""Alert notifications: email (Django's email backend) and a signed webhook, each from a severity threshold.

The webhook body is JSON; ``X-Fleetkeeper-Signature: sha256=<hex>`` is HMAC-SHA256 of the exact body with
DETECTION_WEBHOOK_SECRET, so a receiver can check it came from the console (compare in constant time)."""

from __future__ import annotations

import hashlib
import hmac
import json
import urllib.error
import urllib.request

from django.conf import settings
from django.core.mail import send_mail

from security.models import SEVERITY_RANK, Alert

SIGNATURE_HEADER = "X-Fleetkeeper-Signature"


class WebhookFailed(Exception):
    """A transient delivery failure: the task retries with backoff."""


def sign(body: bytes, secret: str) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def alert_payload(alert: Alert) -> dict:
    return {
        "id": alert.pk,
        "kind": alert.kind,
        "severity": alert.severity,
        "state": alert.state,
        "summary": alert.summary,
        "client_id": alert.client_id,
        "subject": alert.subject,
        "occurrences": alert.occurrences,
        "first_seen": alert.first_seen.isoformat(),
        "last_seen": alert.last_seen.isoformat(),
        "evidence": alert.evidence,
    }


def _at_least(severity: str, threshold: str) -> bool:
    return SEVERITY_RANK.get(severity, 0) >= SEVERITY_RANK.get(threshold, 99)


def channels_for(alert: Alert) -> list[str]:
    wanted = []
    if settings.DETECTION_EMAIL_RECIPIENTS and _at_least(alert.severity, settings.DETECTION_EMAIL_MIN_SEVERITY):
        wanted.append("email")
    if settings.DETECTION_WEBHOOK_URL and _at_least(alert.severity, settings.DETECTION_WEBHOOK_MIN_SEVERITY):
        wanted.append("webhook")
    return wanted


def send_email(alert: Alert) -> None:
    send_mail(
        subject=f"[Fleetkeeper] {alert.get_severity_display()}: {alert.summary}"[:200],
        message=json.dumps(alert_payload(alert), indent=2, default=str),
        from_email=None,
        recipient_list=settings.DETECTION_EMAIL_RECIPIENTS,
    )


def send_webhook(alert: Alert) -> int:
    if not settings.DETECTION_WEBHOOK_URL.startswith(("https://", "http://")):
        raise ValueError("DETECTION_WEBHOOK_URL must be an http(s) URL")
    body = json.dumps({"event": "alert", "alert": alert_payload(alert)}, default=str, separators=(",", ":")).encode()
    request = urllib.request.Request(  # noqa: S310 (scheme checked above)
        settings.DETECTION_WEBHOOK_URL,
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(body, settings.DETECTION_WEBHOOK_SECRET),
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=settings.DETECTION_WEBHOOK_TIMEOUT) as response:  # noqa: S310
            return response.status
    except urllib.error.HTTPError as exc:
        if exc.code >= 500 or exc.code == 429:
            raise WebhookFailed(f"webhook answered {exc.code}") from exc
        return exc.code  # a 4xx will not get better by retrying: recorded, not retried
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise WebhookFailed(str(exc)) from exc
