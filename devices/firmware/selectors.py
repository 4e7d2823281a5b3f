"""Reads for the registry's pages and API; they own the joins, so list pages stay at a constant number of queries."""

from __future__ import annotations

import django_filters
from django.db.models import Count, Q, QuerySet

from devices.models import Device, DeviceModel, FirmwareOffer, FirmwareRelease

from . import versions


class FirmwareReleaseFilterSet(django_filters.FilterSet):
    model = django_filters.ModelChoiceFilter(
        field_name="model", to_field_name="name", queryset=DeviceModel.objects.all(), label="Model"
    )
    version = django_filters.CharFilter(field_name="version", label="Version")
    flag = django_filters.ChoiceFilter(
        choices=[
            ("current", "Not withdrawn"),
            ("withdrawn", "Withdrawn"),
            ("vulnerable", "Known-vulnerable"),
            ("minimum_secure", "Minimum secure"),
        ],
        method="filter_flag",
        label="Flag",
    )

    class Meta:
        model = FirmwareRelease
        fields = ["model", "version", "flag"]

    def filter_flag(self, queryset, name, value):
        return {
            "current": queryset.filter(withdrawn=False),
            "withdrawn": queryset.filter(withdrawn=True),
            "vulnerable": queryset.filter(vulnerable=True),
            "minimum_secure": queryset.filter(minimum_secure=True),
        }.get(value, queryset)


def release_queryset() -> QuerySet[FirmwareRelease]:
    return FirmwareRelease.objects.select_related("model", "key").order_by("model__name", "-version_sort")


def release_list(*, filters=None) -> FirmwareReleaseFilterSet:
    return FirmwareReleaseFilterSet(filters or None, queryset=release_queryset())


def devices_per_version(*, model_ids=None, labels: dict | None = None) -> dict[tuple[int, str], int]:
    """{(model id, sort key of the version): devices running it}: one GROUP BY over the fleet, whatever its size.
    Versions outside the registry's format are keyed by their text. ``labels``, when given, receives the reported
    text of each key (for versions running in the fleet that the registry does not have)."""
    rows = Device.objects.exclude(firmware_version="").exclude(model=None)
    if model_ids is not None:
        rows = rows.filter(model_id__in=list(model_ids))
    counts: dict[tuple[int, str], int] = {}
    for model_id, version, n in rows.order_by().values_list("model_id", "firmware_version").annotate(n=Count("id")):
        key = versions.sort_key(version) if versions.parse(version) else version
        counts[(model_id, key)] = counts.get((model_id, key), 0) + n
        if labels is not None:
            labels.setdefault((model_id, key), version)
    return counts


def offer_counts(*, release_ids) -> dict[int, dict[str, int]]:
    """{release id: {state: offers}} in one query."""
    counts: dict[int, dict[str, int]] = {}
    rows = (
        FirmwareOffer.objects.filter(release_id__in=list(release_ids))
        .order_by()
        .values_list("release_id", "state")
        .annotate(n=Count("id"))
    )
    for release_id, state, n in rows:
        counts.setdefault(release_id, {})[state] = n
    return counts


def offer_targets(*, release: FirmwareRelease, filters=None) -> QuerySet[Device]:
    """Devices the device-list filters select (unknown or invalid filters are refused, never ignored: ValidationError),
    narrowed to the release's model and to devices that can take it and do not already run it."""
    from security.revocation import bulk_filters_clean, bulk_queryset

    cleaned = bulk_filters_clean(filters or {})
    cleaned.pop("model", None)  # the release's model decides
    return (
        bulk_queryset(cleaned)
        .filter(model_id=release.model_id, status__in=[Device.Status.ACTIVE, Device.Status.QUARANTINED])
        .exclude(firmware_version=release.version)
    )


def offer_list(*, release: FirmwareRelease | None = None, client_id: str = "") -> QuerySet[FirmwareOffer]:
    queryset = FirmwareOffer.objects.select_related("release", "release__model")
    if release is not None:
        queryset = queryset.filter(release=release)
    if client_id:
        queryset = queryset.filter(client_id=client_id)
    return queryset.order_by("-created")


def open_offer_filter() -> Q:
    return Q(state__in=[FirmwareOffer.State.PENDING, FirmwareOffer.State.DELIVERED])
