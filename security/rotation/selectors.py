"""Reads for the rotation pages, the API and the overview card, each in a fixed number of queries."""

from __future__ import annotations

from datetime import timedelta

import django_filters
from django.db.models import Count, Q, QuerySet
from django.utils import timezone

from security.models import CredentialRotation, RotationPolicy

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
