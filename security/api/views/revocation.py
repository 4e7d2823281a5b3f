"""Revocation and quarantine API (issue 5). Thin: parse, call security.revocation, answer.

POST /api/v1/devices/<client_id>/revoke/ | quarantine/ | reinstate/   {reason, alert?}  -> 202 the pending action
GET  /api/v1/device-actions/<id>/                                     -> the action with its verification evidence
POST /api/v1/devices/bulk/revoke/ | bulk/quarantine/ {filters, reason, confirm_count} -> 202 the bulk job
GET  /api/v1/bulk-actions/<id>/                                       -> progress and verification counts
"""

from django.shortcuts import get_object_or_404
from django.urls import reverse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.exceptions import NotFound
from rest_framework.response import Response
from rest_framework.views import APIView

from devices.models import Device
from devices.validators import is_valid_client_id
from fleet.api import StrictCharField
from security import revocation
from security.models import BulkAction, DeviceAction

CLIENT_ID = OpenApiParameter(
    "client_id", OpenApiTypes.STR, OpenApiParameter.PATH, description="The device's client id."
)
ID = OpenApiParameter("id", OpenApiTypes.INT, OpenApiParameter.PATH)


class ActionRequestSerializer(serializers.Serializer):
    reason = StrictCharField(max_length=revocation.MAX_REASON_LENGTH, help_text="Why; required, goes to the audit log.")
    alert = serializers.IntegerField(required=False, min_value=1, help_text="The alert this answers, if any.")


class DeviceActionSerializer(serializers.ModelSerializer):
    url = serializers.SerializerMethodField()
    requested_by = serializers.CharField(source="requested_by_label")
    alert = serializers.IntegerField(source="alert_id", allow_null=True)
    bulk = serializers.IntegerField(source="bulk_id", allow_null=True)
    outbox_state = serializers.SerializerMethodField(help_text="The outbox row: pending, applied or failed.")
    needs_new_secret = serializers.SerializerMethodField()

    class Meta:
        model = DeviceAction
        fields = [
            "id",
            "url",
            "client_id",
            "action",
            "reason",
            "alert",
            "bulk",
            "requested_by",
            "requested_at",
            "source_address",
            "state",
            "outbox_state",
            "verified_at",
            "evidence",
            "attempts",
            "last_error",
            "needs_new_secret",
        ]

    def get_url(self, obj) -> str:
        return reverse("api-device-action-detail", args=[obj.pk])

    def get_outbox_state(self, obj) -> str | None:
        return obj.change.state if obj.change_id else None

    def get_needs_new_secret(self, obj) -> bool:
        """A reinstated device that was revoked has no secret: issue one (POST .../credentials/)."""
        return obj.action == "reinstate" and obj.device_id is not None and not hasattr(obj.device, "credential")


class _DeviceActionView(APIView):
    action_name = ""

    @property
    def required_permissions(self):
        from security.services import _TRANSITIONS

        return {"POST": _TRANSITIONS[self.action_name][2]}

    def post(self, request, client_id: str):
        if not is_valid_client_id(client_id):
            raise NotFound("No device has this client id.")
        device = get_object_or_404(Device, client_id=client_id)
        body = ActionRequestSerializer(data=request.data if isinstance(request.data, dict) else {})
        body.is_valid(raise_exception=True)
        record = revocation.device_action_request(
            actor=request.user,
            device=device,
            action=self.action_name,
            reason=body.validated_data["reason"],
            alert_id=body.validated_data.get("alert"),
        )
        data = DeviceActionSerializer(record).data
        return Response(data, status=status.HTTP_202_ACCEPTED, headers={"Location": data["url"]})


def _action_schema(action: str, description: str):
    return extend_schema(
        summary=f"{action.capitalize()} a device",
        description=description + " Answers 202 with the action; poll its `url` until `state` is `verified`.",
        parameters=[CLIENT_ID],
        request=ActionRequestSerializer,
        responses={202: DeviceActionSerializer},
    )


class DeviceRevokeView(_DeviceActionView):
    action_name = "revoke"

    @_action_schema(
        "revoke",
        "Permanent: the credential is deleted, the broker drops the live session at the next reload (within a "
        "second) and refuses reconnection. Reinstating needs a new secret.",
    )
    def post(self, request, client_id: str):
        return super().post(request, client_id)


class DeviceQuarantineView(_DeviceActionView):
    action_name = "quarantine"

    @_action_schema(
        "quarantine",
        "The device keeps only its repair path: it receives on rx/<id>/credentials and rx/<id>/firmware and "
        "publishes on tx/<id>/ack; everything else is denied at once.",
    )
    def post(self, request, client_id: str):
        return super().post(request, client_id)


class DeviceReinstateView(_DeviceActionView):
    action_name = "reinstate"

    @_action_schema(
        "reinstate",
        "Back to active. A device that was revoked has no secret any more: issue a new one afterwards "
        "(`needs_new_secret` says so).",
    )
    def post(self, request, client_id: str):
        return super().post(request, client_id)


class DeviceActionDetailView(APIView):
    required_permissions = {"GET": "devices.view_device"}

    @extend_schema(
        summary="One revoke/quarantine/reinstate and its verification",
        parameters=[ID],
        responses={200: DeviceActionSerializer},
    )
    def get(self, request, pk: int):
        record = DeviceAction.objects.select_related("change", "device").filter(pk=pk).first()
        if record is None:
            raise NotFound("There is no such device action.")
        return Response(DeviceActionSerializer(record).data)


# --- bulk ----------------------------------------------------------------------------------------------------------


class BulkRequestSerializer(serializers.Serializer):
    filters = serializers.DictField(
        help_text="The device list's filters: search, status (a list), model, group, firmware, seen. Unknown names "
        "and invalid values are refused (never ignored)."
    )
    reason = StrictCharField(max_length=revocation.MAX_REASON_LENGTH)
    confirm_count = serializers.IntegerField(
        min_value=1,
        help_text="The number of devices the filters match that the action would change. Send it wrong (e.g. 0) to "
        "be told the number.",
    )


class BulkActionSerializer(serializers.ModelSerializer):
    url = serializers.SerializerMethodField()
    created_by = serializers.CharField(source="created_by_label")
    percent = serializers.IntegerField()
    verification = serializers.SerializerMethodField(help_text="Device actions of this job by state.")

    class Meta:
        model = BulkAction
        fields = [
            "id",
            "url",
            "action",
            "filters",
            "reason",
            "state",
            "total",
            "processed",
            "changed",
            "skipped",
            "percent",
            "errors",
            "verification",
            "created_by",
            "created",
            "finished",
        ]

    def get_url(self, obj) -> str:
        return reverse("api-bulk-action-detail", args=[obj.pk])

    def get_verification(self, obj) -> dict:
        return revocation.bulk_action_counts(obj)


class _BulkView(APIView):
    action_name = ""

    @property
    def required_permissions(self):
        from security.services import _TRANSITIONS

        return {"POST": _TRANSITIONS[self.action_name][2]}

    def post(self, request):
        body = BulkRequestSerializer(data=request.data if isinstance(request.data, dict) else {})
        body.is_valid(raise_exception=True)
        bulk = revocation.bulk_action_create(
            actor=request.user,
            action=self.action_name,
            filters=body.validated_data["filters"],
            reason=body.validated_data["reason"],
            confirm_count=body.validated_data["confirm_count"],
        )
        data = BulkActionSerializer(bulk).data
        return Response(data, status=status.HTTP_202_ACCEPTED, headers={"Location": data["url"]})


def _bulk_schema(action: str):
    return extend_schema(
        summary=f"{action.capitalize()} every device matching the filters",
        description=f"Fixes the set of devices now (only those that can be {action}d) and answers 202 with a job; a "
        "worker works through it in chunks (one broker reload per chunk at most). `confirm_count` must equal the "
        "number of those devices, else 400 says the number.",
        request=BulkRequestSerializer,
        responses={202: BulkActionSerializer},
    )


class BulkRevokeView(_BulkView):
    action_name = "revoke"

    @_bulk_schema("revoke")
    def post(self, request):
        return super().post(request)


class BulkQuarantineView(_BulkView):
    action_name = "quarantine"

    @_bulk_schema("quarantine")
    def post(self, request):
        return super().post(request)


class BulkActionDetailView(APIView):
    required_permissions = {"GET": "devices.view_device"}

    @extend_schema(
        summary="A bulk revoke or quarantine: progress and verification",
        parameters=[ID],
        responses={200: BulkActionSerializer},
    )
    def get(self, request, pk: int):
        bulk = BulkAction.objects.defer("device_ids").filter(pk=pk).first()
        if bulk is None:
            raise NotFound("There is no such bulk action.")
        return Response(BulkActionSerializer(bulk).data)
