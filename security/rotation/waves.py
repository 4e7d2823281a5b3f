"""Waves of a rotation campaign: how the devices are cut into waves (a canary first) and how a settled wave is judged
against the baseline (docs/rotation.md, "Campaigns"). The state machine that runs them is in campaigns.py."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db.models import Count, Q
from django.utils import timezone

from devices.models import Device
from security.models import CredentialRotation, RotationWave

logger = logging.getLogger(__name__)

# Reached "confirmed" at some point: confirmed, switched or completed.
CONFIRMED_OR_LATER = ("confirmed", "switched", "completed")
RECENT_BASELINE_DAYS = 30
RECENT_BASELINE_MIN = 20
ID_CHUNK = 5000  # device ids per query (SQLite's variable limit, and plans that stay index scans)


def plan_waves(ids: list, *, canary_size: int, wave_size: int) -> list[list]:
    """Wave 0 is the canary (``canary_size`` devices), then waves of ``wave_size``."""
    if not ids:
        return []
    waves = [ids[:canary_size]]
    rest = ids[canary_size:]
    waves += [rest[i : i + wave_size] for i in range(0, len(rest), wave_size)]
    return waves


# --- judging a wave -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reason: str
    result: dict


def wave_judge(
    *,
    kind: str,
    started: int,
    confirmed: int,
    reconnected: int,
    online_share: float,
    reconnect_baseline: float,
    min_confirm_ratio: float,
    min_reconnect_ratio: float,
    timed_out: bool,
) -> Verdict:
    """Pure: a wave passes unless its confirmation rate is below ``min_confirm_ratio`` of the share of its devices
    that were online when it started, or (secrets) its reconnect rate among the confirmed devices is below
    ``min_reconnect_ratio`` of the fleet's reconnect baseline."""
    confirm_rate = confirmed / started if started else 1.0
    confirm_needed = min_confirm_ratio * online_share
    result = {
        "started": started,
        "confirmed": confirmed,
        "reconnected": reconnected,
        "confirm_rate": round(confirm_rate, 4),
        "confirm_baseline": round(online_share, 4),
        "confirm_needed": round(confirm_needed, 4),
        "timed_out": timed_out,
    }
    reasons = []
    if started and confirm_rate < confirm_needed:
        reasons.append(
            f"{confirmed} of {started} devices confirmed ({confirm_rate:.0%}), below {min_confirm_ratio:.0%} of the "
            f"{online_share:.0%} that were online when the wave started (needed {confirm_needed:.0%})"
        )
    if kind == "secret":
        reconnect_rate = reconnected / confirmed if confirmed else 1.0
        reconnect_needed = min_reconnect_ratio * reconnect_baseline
        result.update(
            reconnect_rate=round(reconnect_rate, 4),
            reconnect_baseline=round(reconnect_baseline, 4),
            reconnect_needed=round(reconnect_needed, 4),
        )
        if confirmed and reconnect_rate < reconnect_needed:
            reasons.append(
                f"{reconnected} of {confirmed} confirmed devices reconnected with the new secret "
                f"({reconnect_rate:.0%}), below {min_reconnect_ratio:.0%} of the fleet's {reconnect_baseline:.0%}"
            )
    else:
        result["reconnect_rate"] = None  # certificates: the old one stays valid for the grace, no reconnect proof yet
    reason = "; ".join(reasons)
    if reason and timed_out:
        reason += " (judged after the wave timeout)"
    return Verdict(passed=not reasons, reason=reason, result=result)


def fleet_reconnect_baseline(*, exclude_campaign_id: int | None = None) -> dict:
    """Of the secret rotations confirmed in the last 30 days outside this campaign and no longer waiting for the
    device, the share that reconnected with the new secret (completed)."""
    since = timezone.now() - timedelta(days=RECENT_BASELINE_DAYS)
    qs = CredentialRotation.objects.filter(
        kind=CredentialRotation.Kind.SECRET, confirmed_at__gte=since, state__in=["completed", "failed"]
    )
    if exclude_campaign_id is not None:
        qs = qs.exclude(campaign_id=exclude_campaign_id)
    counts = qs.aggregate(total=Count("id"), completed=Count("id", filter=Q(state="completed")))
    if counts["total"] < RECENT_BASELINE_MIN:
        return {
            "reconnect_rate": 1.0,
            "reconnect_source": f"fewer than {RECENT_BASELINE_MIN} recent rotations: every confirmed device is "
            "expected to reconnect",
            "recent_rotations": counts["total"],
        }
    return {
        "reconnect_rate": counts["completed"] / counts["total"],
        "reconnect_source": f"secret rotations confirmed in the last {RECENT_BASELINE_DAYS} days outside this campaign",
        "recent_rotations": counts["total"],
    }


def _online_share(device_ids: list[int]) -> tuple[int, float]:
    cutoff = timezone.now() - timedelta(seconds=settings.ROTATION_CAMPAIGN_ONLINE_SECONDS)
    online = 0
    for i in range(0, len(device_ids), ID_CHUNK):
        online += Device.objects.filter(pk__in=device_ids[i : i + ID_CHUNK], last_seen__gte=cutoff).count()
    return online, (online / len(device_ids) if device_ids else 0.0)


def wave_counts(wave: RotationWave) -> dict[str, int]:
    rows = CredentialRotation.objects.filter(wave=wave).order_by().values_list("state").annotate(n=Count("id"))
    return dict(rows)
