"""Credential rotation API (issue 7). Thin: parse, call security.rotation, answer.

POST /api/v1/devices/<client_id>/rotate/  -> 202 the rotation (pending; poll its `url`), 409 when one is in
                                             progress, 400 when the device has nothing to rotate
GET  /api/v1/rotations/                  -> rotations, newest first (filters: state, client_id, kind, trigger,
                                             open=true)
GET  /api/v1/rotations/<id>/             -> one rotation with its steps
"""

import django_filters
from django.shortcuts import get_object_or_404
from django.urls import reverse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import generics, serializers, status
from rest_framework.exceptions import NotFound
from rest_framework.response import Response
from rest_framework.views import APIView

from devices.models import Device
from devices.validators import is_valid_client_id
from security.models import CredentialRotation
from security.rotation import services as rotation
from security.rotation.selectors import RotationFilterSet, rotation_queryset

CLIENT_ID = OpenApiParameter(
    "client_id", OpenApiTypes.STR, OpenApiParameter.PATH, description="The device's client id."
)


class RotationSerializer(serializers.ModelSerializer):
    url = serializers.SerializerMethodField()
    requested_by = serializers.CharField(source="requested_by_label")
    policy = serializers.CharField(source="policy.name", allow_null=True, default=None)
    campaign = serializers.IntegerField(source="campaign_id", allow_null=True)
    history = serializers.JSONField(help_text="Steps, oldest first: [{at, step, outcome, detail?, ...}].")

    class Meta:
        model = CredentialRotation
        fields = [
            "id",
            "url",
            "client_id",
            "kind",
            "trigger",
            "state",
            "policy",
            "campaign",
            "requested_by",
            "attempts",
            "last_error",
            "created",
            "deadline",
            "delivered_at",
            "confirmed_at",
            "switched_at",
            "completed_at",
            "failed_at",
            "history",
        ]

    def get_url(self, obj) -> str:
        return reverse("api-rotation-detail", args=[obj.pk])


class DeviceRotateView(APIView):
    required_permissions = {"POST": "devices.rotate_credentials"}

    @extend_schema(
        summary="Rotate a device's credential",
        description="Starts the device-confirmed handover (docs/rotation.md): a new secret is sent on "
        "rx/<id>/credentials, the device confirms on tx/<id>/ack, then the broker switches; the old secret works "
        "until then. Certificate devices are asked for a CSR instead. Answers 202 with the rotation; poll its "
        "`url`. 409: a rotation is already in progress. 400: the device is revoked or has no credential.",
        parameters=[CLIENT_ID],
        request=None,
        responses={202: RotationSerializer},
    )
    def post(self, request, client_id: str):
        if not is_valid_client_id(client_id):
            raise NotFound("No device has this client id.")
        device = get_object_or_404(Device, client_id=client_id)
        try:
            started = rotation.rotation_start(actor=request.user, device=device, trigger="manual")
        except rotation.RotationNotPossible as exc:
            code = status.HTTP_409_CONFLICT if exc.code == "in_progress" else status.HTTP_400_BAD_REQUEST
            return Response({"detail": " ".join(exc.messages)}, status=code)
        data = RotationSerializer(started).data
        return Response(data, status=status.HTTP_202_ACCEPTED, headers={"Location": data["url"]})


class RotationListView(generics.ListAPIView):
    required_permissions = {"GET": "security.view_credentialrotation"}
    serializer_class = RotationSerializer
    filterset_class = RotationFilterSet
    filter_backends = [django_filters.rest_framework.DjangoFilterBackend]

    def get_queryset(self):
        return rotation_queryset()

    @extend_schema(summary="Credential rotations, newest first")
    def get(self, request, *args, **kwargs):
        return super().get(request, *args, **kwargs)


class RotationDetailView(APIView):
    required_permissions = {"GET": "security.view_credentialrotation"}

    @extend_schema(
        summary="One credential rotation and its steps",
        parameters=[OpenApiParameter("id", OpenApiTypes.INT, OpenApiParameter.PATH)],
        responses={200: RotationSerializer},
    )
    def get(self, request, pk: int):
        row = rotation_queryset().filter(pk=pk).first()
        if row is None:
            raise NotFound("There is no such rotation.")
        return Response(RotationSerializer(row).data)
