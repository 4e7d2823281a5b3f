"""Read side of alerts: lists, counts and the chart, at a constant number of queries."""

from __future__ import annotations

from datetime import timedelta

from django.db.models import Count
from django.db.models.functions import TruncHour
from django.utils import timezone

from security.models import SEVERITY_RANK, Alert
from security.permissions import user_can


def alert_list(*, user, filters: dict | None = None):
    from .filtersets import AlertFilterSet

    if not user_can(user, "security.view_alert"):
        return Alert.objects.none()
    queryset = Alert.objects.select_related("device", "acknowledged_by", "resolved_by").order_by("-last_seen", "-id")
    return AlertFilterSet(filters or {}, queryset=queryset).qs


def alert_open_by_severity() -> list[tuple[str, str, int]]:
    """[(severity, label, open count)], most severe first; open = not resolved."""
    counts = dict(
        Alert.objects.exclude(state=Alert.State.RESOLVED)
        .values_list("severity")
        .annotate(n=Count("id"))
        .values_list("severity", "n")
    )
    ordered = sorted(Alert.Severity.choices, key=lambda c: -SEVERITY_RANK[c[0]])
    return [(value, label, counts.get(value, 0)) for value, label in ordered]


def alert_timeline(*, hours: int = 24) -> list[dict]:
    """Alerts opened per hour over the last ``hours``, for the overview chart (one query)."""
    now = timezone.now().replace(minute=0, second=0, microsecond=0)
    start = now - timedelta(hours=hours - 1)
    rows = dict(
        Alert.objects.filter(first_seen__gte=start)
        .annotate(hour=TruncHour("first_seen"))
        .values_list("hour")
        .annotate(n=Count("id"))
        .values_list("hour", "n")
    )
    return [
        {"hour": start + timedelta(hours=i), "count": rows.get(start + timedelta(hours=i), 0)} for i in range(hours)
    ]


def alert_chart(*, hours: int = 24, width: int = 480, height: int = 80) -> dict:
    """Bar geometry for an inline SVG (no JavaScript, no CDN)."""
    points = alert_timeline(hours=hours)
    peak = max((p["count"] for p in points), default=0) or 1
    bar = width / len(points)
    bars = []
    for i, point in enumerate(points):
        h = round(point["count"] / peak * (height - 14), 1)
        bars.append(
            {
                "x": round(i * bar + 1, 1),
                "y": round(height - h, 1),
                "w": round(bar - 2, 1),
                "h": h,
                "count": point["count"],
                "hour": point["hour"],
            }
        )
    return {"bars": bars, "width": width, "height": height, "peak": peak, "total": sum(p["count"] for p in points)}
