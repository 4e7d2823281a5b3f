"""Broker enforcement API: issue a device secret (shown once), read the rendered policy, ask for a re-sync.
Thin: every change goes through security.services with the caller as the actor."""

from django.conf import settings
from django.shortcuts import get_object_or_404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from devices.models import Device
from security import services
from security.brokers.overview import policy_overview


class CredentialRequestSerializer(serializers.Serializer):
    password = serializers.CharField(
        required=False,
        allow_blank=True,
        trim_whitespace=False,
        max_length=services.MAX_SECRET_LENGTH,
        help_text="Optional operator-supplied secret (at least MQTT_OPERATOR_SECRET_MIN_LENGTH characters, not "
        "containing the client id, serial or MAC). Leave out to get a 256-bit random secret.",
    )


class BrokerAddressSerializer(serializers.Serializer):
    host = serializers.CharField()
    port = serializers.IntegerField()
    tls_port = serializers.IntegerField()


class CredentialSerializer(serializers.Serializer):
    client_id = serializers.CharField()
    username = serializers.CharField()
    password = serializers.CharField(help_text="Shown once; the console keeps only a hash.")
    broker = BrokerAddressSerializer()
    enforced = serializers.BooleanField(
        help_text="Whether the broker already accepts this secret (and refuses the one it replaced). When false, the "
        "change is on its way: connect after `change` is applied, or ask with `?wait=`."
    )
    change = serializers.IntegerField(help_text="The enforcement change that carries the secret to the broker.")


# The longest ?wait= a request may hold a web worker for.
CREDENTIAL_MAX_WAIT = 10.0


class CredentialQuerySerializer(serializers.Serializer):
    wait = serializers.FloatField(
        required=False,
        default=0.0,
        min_value=0.0,
        max_value=CREDENTIAL_MAX_WAIT,
        help_text=f"Seconds to wait (at most {CREDENTIAL_MAX_WAIT:g}) until the broker enforces the new secret before "
        "answering; the secret is issued either way and `enforced` says which it was.",
    )


def broker_address() -> dict:
    return {"host": settings.MQTT_PUBLIC_HOST, "port": settings.MQTT_PORT, "tls_port": settings.MQTT_TLS_PORT}


class DeviceCredentialView(APIView):
    required_permissions = {"POST": "devices.issue_credentials"}

    @extend_schema(
        summary="Issue a device secret",
        description="Issues (or re-issues) the device's broker secret and returns it once. Re-issuing replaces the "
        "old secret: a session still using it is disconnected when the broker reloads. The broker enforces the new "
        "secret a little later (tens of milliseconds with a worker running): `enforced` says whether it already does, "
        "and `?wait=2` holds the answer until it does (or 2 s have passed) for a station that connects at once.",
        parameters=[OpenApiParameter("client_id", OpenApiTypes.STR, OpenApiParameter.PATH), CredentialQuerySerializer],
        request=CredentialRequestSerializer,
        responses={201: CredentialSerializer},
    )
    def post(self, request, client_id: str):
        device = get_object_or_404(Device, client_id=client_id)
        query = CredentialQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        body = CredentialRequestSerializer(data=request.data if isinstance(request.data, dict) else {})
        body.is_valid(raise_exception=True)
        issued = services.credential_issue(
            actor=request.user, device=device, secret=body.validated_data.get("password") or None
        )
        enforced = services.enforcement_change_wait(issued.change.pk, timeout=query.validated_data["wait"])
        response = Response(
            {
                "client_id": issued.client_id,
                "username": issued.username,
                "password": issued.password,
                "broker": broker_address(),
                "enforced": enforced,
                "change": issued.change.pk,
            },
            status=status.HTTP_201_CREATED,
        )
        response["Cache-Control"] = "no-store"
        response["Pragma"] = "no-cache"
        return response


class PolicySerializer(serializers.Serializer):
    status = serializers.CharField(help_text='"in sync", "N changes pending", "drift found" or "never synced".')
    digest = serializers.CharField()
    config = serializers.CharField()
    acl = serializers.CharField()
    password_file_usernames = serializers.ListField(child=serializers.CharField())
    device_count = serializers.IntegerField()
    quarantined = serializers.ListField(child=serializers.CharField())
    device = serializers.JSONField(allow_null=True, help_text="What ?client_id= may do on the broker.")
    broker = serializers.JSONField()
    outbox = serializers.JSONField()
    diff = serializers.JSONField(help_text="Desired files against what the broker loads; empty when in sync.")


class PolicyView(APIView):
    required_permissions = {"GET": "security.view_brokerstate"}

    @extend_schema(
        summary="The rendered broker policy",
        description="The broker config and ACL as rendered, the password file's usernames (never the hashes), the "
        "broker's state, the enforcement outbox and the diff against what the broker loads. "
        "`?client_id=` adds what that device may do.",
        parameters=[OpenApiParameter("client_id", OpenApiTypes.STR, OpenApiParameter.QUERY, required=False)],
        responses={200: PolicySerializer},
    )
    def get(self, request):
        return Response(policy_overview(client_id=request.query_params.get("client_id", "")))


class SyncSerializer(serializers.Serializer):
    detail = serializers.CharField()


class PolicySyncView(APIView):
    required_permissions = {"POST": "security.sync_policy"}

    @extend_schema(
        summary="Re-sync the broker now",
        description="Enqueues a reconcile: the policy is re-rendered, compared with what the broker loads, "
        "rewritten and reloaded on drift, and probed.",
        request=None,
        responses={202: SyncSerializer},
    )
    def post(self, request):
        services.reconcile_enqueue(actor=request.user, trigger="api")
        return Response({"detail": "A reconcile has been queued."}, status=status.HTTP_202_ACCEPTED)
