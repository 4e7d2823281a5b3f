"""PKI API: sign a device's CSR, a one-time factory bundle, list and revoke a device's certificates, the CA chain.
Thin: every change goes through security.pki.services with the caller as the actor."""

from django.shortcuts import get_object_or_404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from devices.models import Device
from security.models import DeviceCertificate
from security.pki import services as pki

CLIENT_ID = OpenApiParameter("client_id", OpenApiTypes.STR, OpenApiParameter.PATH)


class CsrRequestSerializer(serializers.Serializer):
    csr = serializers.CharField(
        trim_whitespace=False,
        max_length=16 * 1024,
        help_text="PEM certificate signing request; subject CN = the device's client id; EC P-256, Ed25519 or "
        "RSA >= 2048.",
    )
    days = serializers.IntegerField(
        required=False, min_value=1, help_text="Lifetime in days (default settings.PKI_DEVICE_CERT_DAYS)."
    )


class BundleRequestSerializer(serializers.Serializer):
    days = serializers.IntegerField(required=False, min_value=1)


class DeviceCertificateSerializer(serializers.ModelSerializer):
    status = serializers.CharField(source="display_status", help_text="active, revoked or expired")

    class Meta:
        model = DeviceCertificate
        fields = [
            "serial",
            "fingerprint",
            "key_type",
            "not_before",
            "not_after",
            "status",
            "source",
            "revoked_at",
            "reason",
            "created",
        ]


class IssuedSerializer(serializers.Serializer):
    certificate = serializers.CharField(help_text="PEM, CN = client id, clientAuth only.")
    chain = serializers.CharField(help_text="PEM: the issuing CA, then the root.")
    serial = serializers.CharField()
    fingerprint = serializers.CharField()
    not_after = serializers.DateTimeField()


class BundleSerializer(IssuedSerializer):
    private_key = serializers.CharField(help_text="PKCS#8 PEM, shown once: the console does not keep it.")


class RevokeRequestSerializer(serializers.Serializer):
    reason = serializers.CharField(max_length=255)


def _issued(issued: pki.IssuedCertificate) -> dict:
    return {
        "certificate": issued.certificate_pem,
        "chain": issued.chain_pem,
        "serial": issued.record.serial,
        "fingerprint": issued.record.fingerprint,
        "not_after": issued.record.not_after,
    }


class DeviceCertificatesView(APIView):
    required_permissions = {"GET": "devices.view_device", "POST": "devices.issue_credentials"}

    @extend_schema(
        summary="A device's certificates",
        parameters=[CLIENT_ID],
        responses={200: DeviceCertificateSerializer(many=True)},
    )
    def get(self, request, client_id: str):
        device = get_object_or_404(Device, client_id=client_id)
        return Response(DeviceCertificateSerializer(pki.certificate_list(device=device), many=True).data)

    @extend_schema(
        summary="Sign a device's CSR",
        description="Checks the CSR's signature, key type and size, and that its subject CN is the client id; "
        "returns a certificate with CN = client id, clientAuth only, and the CA chain. A bad CSR gets a 400 that "
        "says what is wrong.",
        parameters=[CLIENT_ID],
        request=CsrRequestSerializer,
        responses={201: IssuedSerializer},
    )
    def post(self, request, client_id: str):
        device = get_object_or_404(Device, client_id=client_id)
        body = CsrRequestSerializer(data=request.data if isinstance(request.data, dict) else {})
        body.is_valid(raise_exception=True)
        issued = pki.certificate_issue_from_csr(
            actor=request.user, device=device, csr_pem=body.validated_data["csr"], days=body.validated_data.get("days")
        )
        return Response(_issued(issued), status=status.HTTP_201_CREATED)


class DeviceCertificateBundleView(APIView):
    required_permissions = {"POST": "devices.issue_credentials"}

    @extend_schema(
        summary="Factory bundle: a key and a certificate",
        description="For factory provisioning of devices that cannot make a CSR: the console generates an EC P-256 "
        "key, issues its certificate and returns both once. The key is not stored anywhere.",
        parameters=[CLIENT_ID],
        request=BundleRequestSerializer,
        responses={201: BundleSerializer},
    )
    def post(self, request, client_id: str):
        device = get_object_or_404(Device, client_id=client_id)
        body = BundleRequestSerializer(data=request.data if isinstance(request.data, dict) else {})
        body.is_valid(raise_exception=True)
        issued = pki.certificate_factory_bundle(actor=request.user, device=device, days=body.validated_data.get("days"))
        response = Response({**_issued(issued), "private_key": issued.private_key_pem}, status=status.HTTP_201_CREATED)
        response["Cache-Control"] = "no-store"
        response["Pragma"] = "no-cache"
        return response


class DeviceCertificateRevokeView(APIView):
    required_permissions = {"POST": "devices.revoke_device"}

    @extend_schema(
        summary="Revoke one certificate",
        description="The certificate goes on the CRL and the broker reloads: new connections with it are refused, "
        "and a session still open with it is cut off.",
        parameters=[CLIENT_ID, OpenApiParameter("serial", OpenApiTypes.STR, OpenApiParameter.PATH)],
        request=RevokeRequestSerializer,
        responses={200: DeviceCertificateSerializer},
    )
    def post(self, request, client_id: str, serial: str):
        record = get_object_or_404(DeviceCertificate, client_id=client_id, serial=serial.upper())
        body = RevokeRequestSerializer(data=request.data if isinstance(request.data, dict) else {})
        body.is_valid(raise_exception=True)
        record = pki.certificate_revoke(actor=request.user, certificate=record, reason=body.validated_data["reason"])
        return Response(DeviceCertificateSerializer(record).data)


class CaSerializer(serializers.Serializer):
    issuing = serializers.JSONField()
    root = serializers.JSONField(allow_null=True)
    chain = serializers.CharField(help_text="PEM: the issuing CA, then the root: what devices trust.")
    broker = serializers.JSONField()


class PkiCaView(APIView):
    required_permissions = {"GET": "devices.view_device"}

    @extend_schema(summary="The fleet CAs and the chain devices trust", responses={200: CaSerializer})
    def get(self, request):
        return Response(pki.pki_overview())
