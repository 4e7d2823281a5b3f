"""Reads for the rotation and campaign pages, the API and the overview card, each in a fixed number of queries."""

from __future__ import annotations

from datetime import timedelta

import django_filters
from django.db.models import Count, Q, QuerySet
from django.utils import timezone

from security.models import CredentialRotation, DeviceCertificate, DeviceCredential, RotationCampaign, RotationPolicy

from .waves import CONFIRMED_OR_LATER, ID_CHUNK

State = CredentialRotation.State
YES_NO = [("true", "Yes"), ("false", "No")]


def rotation_queryset() -> QuerySet[CredentialRotation]:
    return CredentialRotation.objects.select_related("policy").order_by("-created", "-id")


class RotationFilterSet(django_filters.FilterSet):
    """One FilterSet for the rotation list page and GET /api/v1/rotations/."""

    client_id = django_filters.CharFilter(field_name="client_id", lookup_expr="iexact", label="Device (client id)")
    state = django_filters.MultipleChoiceFilter(choices=State.choices, label="State")
    kind = django_filters.ChoiceFilter(choices=CredentialRotation.Kind.choices, label="Kind")
    trigger = django_filters.ChoiceFilter(choices=CredentialRotation.Trigger.choices, label="Trigger")
    # "true" / "false" only (a BooleanFilter would take anything else as "no filter" instead of refusing it).
    open = django_filters.ChoiceFilter(choices=YES_NO, method="filter_open", label="Open (not finished)")
    overdue = django_filters.ChoiceFilter(choices=YES_NO, method="filter_overdue", label="Overdue (past the grace)")

    class Meta:
        model = CredentialRotation
        fields = ["client_id", "state", "kind", "trigger", "open", "overdue"]

    def filter_open(self, queryset, name, value):
        q = Q(state__in=CredentialRotation.OPEN_STATES)
        return queryset.filter(q) if value == "true" else queryset.exclude(q)

    def filter_overdue(self, queryset, name, value):
        q = _overdue_q(timezone.now())
        return queryset.filter(q) if value == "true" else queryset.exclude(q)


def _overdue_q(now) -> Q:
    """Waiting for the device past the grace period (the tick fails these shortly), or switched and not proven for
    long: both need a person's attention."""
    return Q(state__in=[State.PENDING, State.DELIVERED], deadline__lt=now)


def rotation_counts() -> dict:
    """For the overview: confirmed (completed in the last 30 days), pending (open), overdue, failed (30 days).
    One query."""
    now = timezone.now()
    recent = now - timedelta(days=30)
    row = CredentialRotation.objects.aggregate(
        confirmed=Count("id", filter=Q(state=State.COMPLETED, completed_at__gte=recent)),
        pending=Count("id", filter=Q(state__in=CredentialRotation.OPEN_STATES)),
        overdue=Count("id", filter=_overdue_q(now)),
        failed=Count("id", filter=Q(state=State.FAILED, failed_at__gte=recent)),
        switched=Count("id", filter=Q(state=State.SWITCHED)),
    )
    return {**row, "days": 30}


def device_rotations(*, client_id: str, limit: int = 10) -> list[CredentialRotation]:
    return list(rotation_queryset().filter(client_id=client_id)[:limit])


def policy_list() -> list[RotationPolicy]:
    return list(
        RotationPolicy.objects.select_related(
            "device_model", "group", "periodic_task", "periodic_task__interval", "periodic_task__crontab"
        ).order_by("scope", "name")
    )


# --- campaign reads ---------------------------------------------------------------------------------------------


def campaign_list():
    return RotationCampaign.objects.select_related("created_by").defer("device_ids").order_by("-created", "-id")


def campaign_waves(campaign: RotationCampaign) -> list[dict]:
    """Every wave with its rotations counted by state: two queries whatever the number of waves."""
    per_wave: dict[int, dict[str, int]] = {}
    for wave_id, state, n in (
        CredentialRotation.objects.filter(campaign=campaign)
        .order_by()
        .values_list("wave_id", "state")
        .annotate(n=Count("id"))
    ):
        per_wave.setdefault(wave_id, {})[state] = n
    out = []
    for wave in campaign.waves.defer("device_ids").order_by("number"):
        counts = per_wave.get(wave.pk, {})
        started = sum(counts.values())
        confirmed = sum(counts.get(s, 0) for s in CONFIRMED_OR_LATER)
        out.append(
            {
                "number": wave.number,
                "canary": wave.number == 0,
                "size": wave.size,
                "state": wave.state,
                "started_at": wave.started_at,
                "finished_at": wave.finished_at,
                "counts": {state: counts.get(state, 0) for state in CredentialRotation.State.values},
                "started": started,
                "confirmed": confirmed,
                "completed": counts.get("completed", 0),
                "failed": counts.get("failed", 0),
                "percent": round(100 * sum(counts.get(s, 0) for s in ("completed", "failed", "cancelled")) / wave.size)
                if wave.size
                else 100,
                "result": wave.result,
            }
        )
    return out


def campaign_summary(campaign: RotationCampaign) -> dict:
    counts = dict(
        CredentialRotation.objects.filter(campaign=campaign).order_by().values_list("state").annotate(n=Count("id"))
    )
    started = sum(counts.values())
    return {
        "total": campaign.total,
        "started": started,
        "confirmed": sum(counts.get(s, 0) for s in CONFIRMED_OR_LATER),
        "completed": counts.get("completed", 0),
        "failed": counts.get("failed", 0),
        "cancelled": counts.get("cancelled", 0),
        "open": sum(counts.get(s, 0) for s in CredentialRotation.OPEN_STATES),
    }


def rotation_debt(campaign: RotationCampaign, *, limit: int = 50) -> dict:
    """Devices of the campaign still on a credential issued before it started, oldest first: (client id, issued
    at). Secrets: the DeviceCredential's issued_at; certificates: when the active certificate was issued."""
    since = campaign.started_at or campaign.created
    ids = campaign.device_ids
    total = 0
    rows: list[tuple] = []
    for i in range(0, len(ids), ID_CHUNK):
        chunk = ids[i : i + ID_CHUNK]
        if campaign.kind == "certificate":
            qs = DeviceCertificate.objects.filter(
                device_id__in=chunk, status=DeviceCertificate.Status.ACTIVE, created__lt=since
            ).exclude(
                device_id__in=DeviceCertificate.objects.filter(
                    device_id__in=chunk, status=DeviceCertificate.Status.ACTIVE, created__gte=since
                ).values("device_id")
            )
            total += qs.values("device_id").distinct().count()
            rows += list(qs.order_by("created").values_list("client_id", "created")[:limit])
        else:
            qs = DeviceCredential.objects.filter(device_id__in=chunk, issued_at__lt=since)
            total += qs.count()
            rows += list(qs.order_by("issued_at").values_list("device__client_id", "issued_at")[:limit])
    rows.sort(key=lambda r: r[1])
    seen, oldest = set(), []
    for client_id, issued_at in rows:
        if client_id not in seen:
            seen.add(client_id)
            oldest.append({"client_id": client_id, "issued_at": issued_at})
        if len(oldest) >= limit:
            break
    return {"total": total, "oldest": oldest, "since": since}
