import django_filters

from .models import AuditEvent


class AuditEventFilterSet(django_filters.FilterSet):
    """Used by the audit log page and GET /api/v1/audit-log/ alike."""

    actor = django_filters.CharFilter(field_name="actor_label", lookup_expr="iexact", label="Actor")
    action = django_filters.CharFilter(field_name="action", lookup_expr="istartswith", label="Action")
    object_type = django_filters.CharFilter(field_name="object_type", label="Object type")
    object_id = django_filters.CharFilter(field_name="object_id", label="Object id")
    request_id = django_filters.CharFilter(field_name="request_id", label="Request id")
    since = django_filters.IsoDateTimeFilter(field_name="created", lookup_expr="gte", label="Since")
    until = django_filters.IsoDateTimeFilter(field_name="created", lookup_expr="lt", label="Until")

    class Meta:
        model = AuditEvent
        fields = ["actor", "action", "object_type", "object_id", "request_id", "since", "until"]
