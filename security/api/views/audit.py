"""GET /api/v1/audit-log/: the append-only audit trail, read-only (there is no write path at all)."""

from django.urls import path
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_view
from rest_framework import serializers, viewsets

from security.filtersets import AuditEventFilterSet
from security.models import AuditEvent


class AuditEventSerializer(serializers.ModelSerializer):
    actor = serializers.CharField(source="actor_label", help_text="User name, or service:<name> for jobs.")
    before = serializers.JSONField(allow_null=True, help_text="The object's fields before the change.")
    after = serializers.JSONField(allow_null=True, help_text="The object's fields after the change.")

    class Meta:
        model = AuditEvent
        fields = [
            "id",
            "created",
            "actor",
            "action",
            "object_type",
            "object_id",
            "before",
            "after",
            "source_address",
            "request_id",
        ]
        read_only_fields = fields


# An empty value means "no limit" (the audit log page's filter form sends them that way).
_TIME_OR_EMPTY = {"anyOf": [{"type": "string", "format": "date-time"}, {"type": "string", "maxLength": 0}]}


@extend_schema_view(
    list=extend_schema(
        summary="Audit log",
        description="Who did what, to what, when and from where; newest first.",
        parameters=[
            OpenApiParameter("since", _TIME_OR_EMPTY, description="Events at or after this time (ISO 8601)."),
            OpenApiParameter("until", _TIME_OR_EMPTY, description="Events before this time (ISO 8601)."),
        ],
    ),
    retrieve=extend_schema(summary="One audit event"),
)
class AuditEventViewSet(viewsets.ReadOnlyModelViewSet):
    # GET needs security.view_auditevent (the permission gate derives it from the model).
    queryset = AuditEvent.objects.select_related(None).order_by("-created", "-id")
    serializer_class = AuditEventSerializer
    filterset_class = AuditEventFilterSet
    lookup_value_regex = "[0-9]+"


# Included at /api/v1/audit-log/ by security/api/urls.py.
urlpatterns = [
    path("", AuditEventViewSet.as_view({"get": "list"}), name="api-auditevent-list"),
    path("<int:pk>/", AuditEventViewSet.as_view({"get": "retrieve"}), name="api-auditevent-detail"),
]
