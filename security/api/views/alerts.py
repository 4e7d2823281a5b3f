"""GET /api/v1/alerts/ (filters: device, kind, severity, state), GET /api/v1/alerts/<id>/,
POST /api/v1/alerts/<id>/acknowledge/ and .../resolve/ {comment}. Reading needs security.view_alert; acting needs
security.change_alert (support, admin)."""

from django.core.exceptions import ValidationError
from django.shortcuts import get_object_or_404
from django.urls import path
from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import serializers, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import ValidationError as ApiValidationError
from rest_framework.response import Response

from security.detection.alerts import alert_acknowledge, alert_resolve
from security.detection.filtersets import AlertFilterSet
from security.models import Alert


class AlertSerializer(serializers.ModelSerializer):
    device = serializers.CharField(source="device.client_id", allow_null=True, default=None)
    acknowledged_by = serializers.CharField(source="acknowledged_by.username", allow_null=True, default=None)
    resolved_by = serializers.CharField(source="resolved_by.username", allow_null=True, default=None)
    evidence = serializers.JSONField(help_text="Counts, samples, source address: what the detector saw.")
    response = serializers.JSONField(help_text="Automatic response and notifications, if any.")

    class Meta:
        model = Alert
        fields = [
            "id",
            "kind",
            "severity",
            "state",
            "summary",
            "device",
            "client_id",
            "subject",
            "evidence",
            "first_seen",
            "last_seen",
            "occurrences",
            "acknowledged_by",
            "acknowledged_at",
            "acknowledge_comment",
            "resolved_by",
            "resolved_at",
            "resolve_comment",
            "response",
        ]
        read_only_fields = fields


class AlertCommentSerializer(serializers.Serializer):
    comment = serializers.CharField(max_length=2000, required=False, allow_blank=True, default="")


@extend_schema_view(
    list=extend_schema(summary="Alerts", description="Newest activity first. Filters: device, kind, severity, state."),
    retrieve=extend_schema(summary="One alert with its evidence"),
    acknowledge=extend_schema(summary="Acknowledge an open alert", request=AlertCommentSerializer),
    resolve=extend_schema(summary="Resolve an alert", request=AlertCommentSerializer),
)
class AlertViewSet(viewsets.ReadOnlyModelViewSet):
    queryset = Alert.objects.select_related("device", "acknowledged_by", "resolved_by").order_by("-last_seen", "-id")
    serializer_class = AlertSerializer
    filterset_class = AlertFilterSet
    required_permissions = {"acknowledge": "security.change_alert", "resolve": "security.change_alert"}

    def _act(self, request, pk, service):
        alert = get_object_or_404(Alert, pk=pk)
        body = AlertCommentSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        try:
            alert = service(actor=request.user, alert=alert, comment=body.validated_data["comment"])
        except ValidationError as exc:
            raise ApiValidationError({"state": exc.messages}) from exc
        return Response(AlertSerializer(alert).data)

    @action(detail=True, methods=["post"])
    def acknowledge(self, request, pk=None):
        return self._act(request, pk, alert_acknowledge)

    @action(detail=True, methods=["post"])
    def resolve(self, request, pk=None):
        return self._act(request, pk, alert_resolve)


# Included at /api/v1/alerts/ by security/api/urls.py.
urlpatterns = [
    path("", AlertViewSet.as_view({"get": "list"}), name="api-alert-list"),
    path("<int:pk>/", AlertViewSet.as_view({"get": "retrieve"}), name="api-alert-detail"),
    path("<int:pk>/acknowledge/", AlertViewSet.as_view({"post": "acknowledge"}), name="api-alert-acknowledge"),
    path("<int:pk>/resolve/", AlertViewSet.as_view({"post": "resolve"}), name="api-alert-resolve"),
]
