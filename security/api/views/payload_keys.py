"""Payload keys API: issue a device's payload key (shown once), read its state, require sealed payloads.
Thin: every change goes through security.payloads with the caller as the actor."""

from django.core.exceptions import ValidationError
from django.shortcuts import get_object_or_404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.exceptions import NotFound
from rest_framework.exceptions import ValidationError as BadRequest
from rest_framework.response import Response
from rest_framework.views import APIView

from devices.models import Device
from fleetkeeper_device import sealing
from security import payloads

CLIENT_ID = OpenApiParameter("client_id", OpenApiTypes.STR, OpenApiParameter.PATH)


class PayloadKeyRequestSerializer(serializers.Serializer):
    required = serializers.BooleanField(
        required=False,
        allow_null=True,
        default=None,
        help_text="true: clear-text messages from this device are dropped and alerted; false: accepted; null or "
        "left out: the fleet setting PAYLOAD_ENCRYPTION_REQUIRED decides (a re-issue keeps the device's setting).",
    )


class PayloadKeyStateSerializer(serializers.Serializer):
    client_id = serializers.CharField()
    key_id = serializers.CharField(help_text="Hex; every sealed message carries it.")
    state = serializers.CharField()
    required = serializers.BooleanField(allow_null=True, help_text="The device's own setting (null: fleet setting).")
    required_effective = serializers.BooleanField()
    created = serializers.DateTimeField()


class IssuedPayloadKeySerializer(serializers.Serializer):
    client_id = serializers.CharField()
    key_id = serializers.CharField()
    payload_key = serializers.CharField(help_text="Shown once: fkpk1.<base64url of 32 bytes>. Stored encrypted.")
    required = serializers.BooleanField(help_text="Whether clear text from this device is now refused.")
    replaced_key_id = serializers.CharField(allow_null=True)
    envelope = serializers.JSONField(help_text="The algorithm and layout the device must use.")


def _state(row) -> dict:
    return {
        "client_id": row.client_id,
        "key_id": row.key_id,
        "state": row.state,
        "required": row.required,
        "required_effective": payloads.required_effective(row),
        "created": row.created,
    }


def _body(request) -> dict:
    body = PayloadKeyRequestSerializer(data=request.data if isinstance(request.data, dict) else {})
    body.is_valid(raise_exception=True)
    return body.validated_data


class DevicePayloadKeyView(APIView):
    required_permissions = {
        "GET": "devices.view_device",
        "POST": "devices.issue_credentials",
        "PATCH": "devices.issue_credentials",
    }

    @extend_schema(
        summary="The device's payload key (without the key)",
        parameters=[CLIENT_ID],
        responses={200: PayloadKeyStateSerializer},
    )
    def get(self, request, client_id: str):
        device = get_object_or_404(Device, client_id=client_id)
        row = payloads.payload_key_for(device)
        if row is None:
            raise NotFound(f"{client_id} has no payload key. POST to this URL to issue one.")
        return Response(_state(row))

    @extend_schema(
        summary="Issue a device payload key",
        description="Issues (or re-issues) the device's payload key for sealed payloads (docs/device-protocol.md, "
        '"Payload encryption") and returns it once. Re-issuing retires the old key at once: messages still sealed '
        "with it are refused (payload_tampered) until the device has the new one.",
        parameters=[CLIENT_ID],
        request=PayloadKeyRequestSerializer,
        responses={201: IssuedPayloadKeySerializer},
    )
    def post(self, request, client_id: str):
        device = get_object_or_404(Device, client_id=client_id)
        try:
            issued = payloads.payload_key_issue(actor=request.user, device=device, required=_body(request)["required"])
        except ValidationError as exc:
            raise BadRequest({"detail": exc.messages}) from exc
        response = Response(
            {
                "client_id": device.client_id,
                "key_id": issued.key_id,
                "payload_key": issued.key_text,
                "required": issued.required,
                "replaced_key_id": issued.replaced,
                "envelope": {
                    "version": sealing.VERSION,
                    "algorithm": "ChaCha20-Poly1305",
                    "associated_data": "header, topic, client id",
                    "overhead_bytes": sealing.OVERHEAD,
                },
            },
            status=status.HTTP_201_CREATED,
        )
        response["Cache-Control"] = "no-store"
        response["Pragma"] = "no-cache"
        return response

    @extend_schema(
        summary="Require (or stop requiring) sealed payloads from the device",
        parameters=[CLIENT_ID],
        request=PayloadKeyRequestSerializer,
        responses={200: PayloadKeyStateSerializer},
    )
    def patch(self, request, client_id: str):
        device = get_object_or_404(Device, client_id=client_id)
        try:
            row = payloads.payload_key_set_required(
                actor=request.user, device=device, required=_body(request)["required"]
            )
        except ValidationError as exc:
            raise BadRequest({"detail": exc.messages}) from exc
        return Response(_state(row))
