from datetime import timedelta

import django_filters
from django import forms
from django_filters.fields import IsoDateTimeField

from .models import AuditEvent

_MAX_OFFSET = timedelta(hours=14)  # the widest real-world UTC offset (Kiribati); databases refuse much more


class _BoundedIsoDateTimeField(IsoDateTimeField):
    def clean(self, value):
        cleaned = super().clean(value)
        offset = cleaned.utcoffset() if cleaned is not None else None
        if offset is not None and abs(offset) > _MAX_OFFSET:
            raise forms.ValidationError("The time zone offset must be between -14:00 and +14:00.", code="invalid")
        return cleaned


class BoundedIsoDateTimeFilter(django_filters.IsoDateTimeFilter):
    """ISO 8601 date-time with a sane UTC offset: PostgreSQL rejects an offset like -22:56 with a
    database error, which would otherwise surface as a 500 instead of a 400."""

    field_class = _BoundedIsoDateTimeField


class AuditEventFilterSet(django_filters.FilterSet):
    """Used by the audit log page and GET /api/v1/audit-log/ alike."""

    actor = django_filters.CharFilter(field_name="actor_label", lookup_expr="iexact", label="Actor")
    action = django_filters.CharFilter(field_name="action", lookup_expr="istartswith", label="Action")
    object_type = django_filters.CharFilter(field_name="object_type", label="Object type")
    object_id = django_filters.CharFilter(field_name="object_id", label="Object id")
    request_id = django_filters.CharFilter(field_name="request_id", label="Request id")
    since = BoundedIsoDateTimeFilter(field_name="created", lookup_expr="gte", label="Since")
    until = BoundedIsoDateTimeFilter(field_name="created", lookup_expr="lt", label="Until")

    class Meta:
        model = AuditEvent
        fields = ["actor", "action", "object_type", "object_id", "request_id", "since", "until"]
