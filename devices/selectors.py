"""Reads. Selectors own select_related/prefetch_related so list pages run a constant number of queries."""

from datetime import timedelta

from django.conf import settings
from django.db.models import Count, QuerySet
from django.utils import timezone

from .filtersets import DeviceFilterSet
from .models import Device, DeviceGroup, DeviceModel, ImportJob


def device_queryset() -> QuerySet[Device]:
    return Device.objects.select_related("model").prefetch_related("groups")


def device_list(*, user, filters=None) -> DeviceFilterSet:
    """The filtered device list. Returns the FilterSet so views can show its form and errors."""
    return DeviceFilterSet(filters or {}, queryset=device_queryset())


def device_get(*, client_id: str) -> Device:
    return device_queryset().get(client_id=client_id)


def fleet_overview() -> dict:
    """The overview page in a fixed number of queries, whatever the fleet size."""
    now = timezone.now()
    cutoff = now - timedelta(minutes=settings.FLEET_RECENTLY_SEEN_MINUTES)
    by_status = dict(Device.objects.order_by().values_list("status").annotate(n=Count("id")))
    statuses = [(value, label, by_status.get(value, 0)) for value, label in Device.Status.choices]
    by_model = list(
        Device.objects.order_by().values("model__name").annotate(n=Count("id")).order_by("-n", "model__name")[:20]
    )
    return {
        "total": sum(by_status.values()),
        "by_status": statuses,
        "by_model": by_model,
        "seen_recently_count": Device.objects.filter(last_seen__gte=cutoff).count(),
        "never_seen_count": Device.objects.filter(last_seen__isnull=True).count(),
        "recently_seen": list(
            Device.objects.select_related("model").filter(last_seen__gte=cutoff).order_by("-last_seen")[:10]
        ),
        "never_seen": list(
            Device.objects.select_related("model").filter(last_seen__isnull=True).order_by("-created")[:10]
        ),
        "recent_minutes": settings.FLEET_RECENTLY_SEEN_MINUTES,
    }


def devicemodel_list() -> QuerySet[DeviceModel]:
    return DeviceModel.objects.annotate(device_count=Count("devices")).order_by("name")


def devicegroup_list() -> QuerySet[DeviceGroup]:
    return DeviceGroup.objects.annotate(device_count=Count("devices")).order_by("name")


def import_job_list(*, user) -> QuerySet[ImportJob]:
    return ImportJob.objects.select_related("created_by").defer("content")
