"""One FilterSet per model, used by the HTML lists and the API alike (NetBox's shape)."""

from datetime import timedelta

import django_filters
from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from .models import Device, DeviceGroup, DeviceModel


class DeviceFilterSet(django_filters.FilterSet):
    search = django_filters.CharFilter(method="filter_search", label="Search")
    status = django_filters.MultipleChoiceFilter(choices=Device.Status.choices)
    model = django_filters.ModelChoiceFilter(
        field_name="model", to_field_name="name", queryset=DeviceModel.objects.all(), label="Model"
    )
    group = django_filters.ModelChoiceFilter(
        field_name="groups", to_field_name="name", queryset=DeviceGroup.objects.all(), label="Group"
    )
    firmware = django_filters.CharFilter(field_name="firmware_version", label="Firmware")
    seen = django_filters.ChoiceFilter(
        choices=[("recent", "Seen recently"), ("stale", "Not seen recently"), ("never", "Never seen")],
        method="filter_seen",
        label="Last seen",
    )
    ordering = django_filters.OrderingFilter(
        fields=(
            ("client_id", "client_id"),
            ("name", "name"),
            ("status", "status"),
            ("model__name", "model"),
            ("firmware_version", "firmware"),
            ("last_seen", "last_seen"),
            ("created", "created"),
        ),
        label="Sort by",
    )

    class Meta:
        model = Device
        fields = ["search", "status", "model", "group", "firmware", "seen"]

    def filter_search(self, queryset, name, value):
        value = value.strip()
        if not value:
            return queryset
        return queryset.filter(
            Q(client_id__icontains=value)
            | Q(name__icontains=value)
            | Q(serial__icontains=value)
            | Q(mac__icontains=value.lower())
        )

    def filter_seen(self, queryset, name, value):
        cutoff = timezone.now() - timedelta(minutes=settings.FLEET_RECENTLY_SEEN_MINUTES)
        if value == "recent":
            return queryset.filter(last_seen__gte=cutoff)
        if value == "stale":
            return queryset.filter(last_seen__lt=cutoff)
        if value == "never":
            return queryset.filter(last_seen__isnull=True)
        return queryset
