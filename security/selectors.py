from django.db.models import QuerySet

from .filtersets import AuditEventFilterSet
from .models import AuditEvent


def audit_event_list(*, user, filters=None) -> AuditEventFilterSet:
    return AuditEventFilterSet(filters or {}, queryset=AuditEvent.objects.all())


def audit_events_for(*, object_type: str, object_id: str, limit: int = 20) -> QuerySet[AuditEvent]:
    return AuditEvent.objects.filter(object_type=object_type, object_id=object_id)[:limit]
