"""Checks that need a clock rather than a message: silent devices."""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from devices.models import Device

from .ingest import raise_findings
from .rules import Finding

MAX_PER_RUN = 1000  # alerts raised per run; the rest are found by the next run


def silent_devices_check(*, silence_seconds: int | None = None) -> int:
    """Active devices seen before but not within the silence window. One query; one alert per device (an open
    alert for a device still silent just gains an occurrence)."""
    seconds = silence_seconds or settings.DETECTION_SILENCE_SECONDS
    cutoff = timezone.now() - timedelta(seconds=seconds)
    rows = list(
        Device.objects.filter(status=Device.Status.ACTIVE, last_seen__isnull=False, last_seen__lt=cutoff)
        .order_by("last_seen")
        .values_list("client_id", "last_seen")[:MAX_PER_RUN]
    )
    findings = [
        Finding(
            "device_silent",
            subject=client_id,
            client_id=client_id,
            summary=f"{client_id} has sent nothing since {last_seen:%Y-%m-%d %H:%M:%S} UTC",
            evidence={"last_seen": last_seen.isoformat(), "silence_limit_seconds": seconds},
        )
        for client_id, last_seen in rows
    ]
    raise_findings(findings)
    return len(findings)
