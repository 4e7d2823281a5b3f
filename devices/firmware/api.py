"""Firmware registry API. Thin: parse, call devices.firmware.services, answer.

GET  /api/v1/firmware/                     releases (filters: model, version, flag; paginated)
POST /api/v1/firmware/                     register and sign a release: multipart with `image` (the console stores it
                                           and computes size and SHA-256), or JSON with `url`, `sha256`, `size`
GET  /api/v1/firmware/<id>/                one release with its offers' counts by state
POST /api/v1/firmware/<id>/withdraw/       {reason}
POST /api/v1/firmware/<id>/vulnerable/     {advisory}
POST /api/v1/firmware/<id>/offer/          {client_ids: [...]} or {filters: {device-list filters}, confirm_count}
GET  /api/v1/firmware/signing-key/         the active public key (PEM) and key id, for firmware teams
"""

from django.conf import settings
from django.urls import include, path, reverse
from drf_spectacular.utils import extend_schema, extend_schema_field
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound
from rest_framework.parsers import FormParser, JSONParser, MultiPartParser
from rest_framework.response import Response
from rest_framework.routers import SimpleRouter
from rest_framework.views import APIView

from devices.models import DeviceModel, FirmwareRelease, FirmwareSigningKey

from . import selectors, services, versions

VIEW = "devices.view_firmwarerelease"


class FirmwareReleaseSerializer(serializers.ModelSerializer):
    url = serializers.SerializerMethodField()
    model = serializers.CharField(source="model.name")
    key_id = serializers.CharField(source="key.key_id")
    image_url = serializers.SerializerMethodField(help_text="Where devices download the image.")
    released_by = serializers.CharField(source="released_by_label")

    class Meta:
        model = FirmwareRelease
        fields = [
            "id",
            "url",
            "model",
            "version",
            "image_url",
            "size",
            "sha256",
            "signature",
            "key_id",
            "notes",
            "released_at",
            "released_by",
            "minimum_secure",
            "vulnerable",
            "advisory",
            "vulnerable_at",
            "withdrawn",
            "withdrawn_reason",
            "withdrawn_at",
        ]

    def get_url(self, obj) -> str:
        return reverse("api-firmware-detail", args=[obj.pk])

    def get_image_url(self, obj) -> str:
        if obj.url:
            return obj.url
        base = settings.FIRMWARE_DOWNLOAD_BASE_URL
        return (base or "") + reverse("firmware-image", args=[obj.sha256])


class FirmwareReleaseDetailSerializer(FirmwareReleaseSerializer):
    offers = serializers.SerializerMethodField()

    class Meta(FirmwareReleaseSerializer.Meta):
        fields = [*FirmwareReleaseSerializer.Meta.fields, "offers"]

    @extend_schema_field(serializers.DictField(child=serializers.IntegerField()))
    def get_offers(self, obj) -> dict:
        return selectors.offer_counts(release_ids=[obj.pk]).get(obj.pk, {})


class ReleaseCreateSerializer(serializers.Serializer):
    model = serializers.SlugRelatedField(
        slug_field="name", queryset=DeviceModel.objects.all(), help_text="The device model's name."
    )
    version = serializers.CharField(max_length=64, help_text=versions.FORMAT_HELP)
    image = serializers.FileField(required=False, help_text="The image (multipart upload).")
    url = serializers.URLField(required=False, allow_blank=True, max_length=2048, help_text="Image hosted elsewhere.")
    sha256 = serializers.RegexField(r"^[0-9a-fA-F]{64}$", required=False, help_text="With `url`: the image's SHA-256.")
    size = serializers.IntegerField(required=False, min_value=1, help_text="With `url`: the image's size in bytes.")
    notes = serializers.CharField(required=False, allow_blank=True, default="")
    minimum_secure = serializers.BooleanField(required=False, default=False)

    def validate_version(self, value):
        try:
            return versions.validate(value)
        except versions.InvalidVersion as exc:
            raise serializers.ValidationError(str(exc)) from None


class WithdrawSerializer(serializers.Serializer):
    reason = serializers.CharField(max_length=2000, help_text="Why; shown to operators and in the alerts.")


class VulnerableSerializer(serializers.Serializer):
    advisory = serializers.CharField(max_length=5000, help_text="CVE, what is affected, what to install instead.")


class OfferRequestSerializer(serializers.Serializer):
    client_ids = serializers.ListField(
        child=serializers.CharField(max_length=128), required=False, max_length=100_000, help_text="Devices by id."
    )
    filters = serializers.DictField(
        required=False,
        help_text="Device-list filters (search, status, group, firmware, seen); the release's model is implied.",
    )
    confirm_count = serializers.IntegerField(
        required=False, help_text="With `filters`: the number of devices they match (a typo cannot reach the fleet)."
    )

    def validate(self, attrs):
        if ("client_ids" in attrs) == ("filters" in attrs):
            raise serializers.ValidationError("Give either `client_ids` or `filters` (with `confirm_count`).")
        if "filters" in attrs and "confirm_count" not in attrs:
            raise serializers.ValidationError({"confirm_count": "Give the number of devices the filters match."})
        return attrs


class OfferResultSerializer(serializers.Serializer):
    offered = serializers.IntegerField()
    skipped = serializers.DictField(child=serializers.IntegerField(), help_text="Devices left out, by reason.")
    offers = serializers.ListField(child=serializers.IntegerField(), help_text="Ids of the offer rows.")


class SigningKeySerializer(serializers.ModelSerializer):
    class Meta:
        model = FirmwareSigningKey
        fields = ["key_id", "public_key_pem", "created", "active"]


class FirmwareReleaseViewSet(
    mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.CreateModelMixin, viewsets.GenericViewSet
):
    queryset = FirmwareRelease.objects.none()  # for the schema and RolePermission; get_queryset reads the selector
    serializer_class = FirmwareReleaseSerializer
    filterset_class = selectors.FirmwareReleaseFilterSet
    lookup_value_regex = r"\d+"
    parser_classes = [MultiPartParser, FormParser, JSONParser]
    required_permissions = {
        "list": VIEW,
        "retrieve": VIEW,
        "create": "devices.add_firmwarerelease",
        "withdraw": "devices.withdraw_firmware",
        "vulnerable": "devices.flag_firmware",
        "offer": "devices.offer_firmware",
    }

    def get_queryset(self):
        return selectors.release_queryset()

    def get_serializer_class(self):
        return FirmwareReleaseDetailSerializer if self.action == "retrieve" else FirmwareReleaseSerializer

    def _release(self) -> FirmwareRelease:
        release = selectors.release_queryset().filter(pk=self.kwargs["pk"]).first()
        if release is None:
            raise NotFound("There is no such firmware release.")
        return release

    @extend_schema(summary="Firmware releases, per model, newest version first")
    def list(self, request, *args, **kwargs):
        return super().list(request, *args, **kwargs)

    @extend_schema(summary="One firmware release, with its offers counted by state")
    def retrieve(self, request, *args, **kwargs):
        return super().retrieve(request, *args, **kwargs)

    @extend_schema(
        summary="Register and sign a firmware release",
        description="multipart/form-data with `image`: the console stores the image, computes its size and SHA-256 "
        "and signs the digest with the active key. Or JSON with `url`, `sha256` and `size` of an image hosted "
        "elsewhere: the console signs the digest as given. " + versions.FORMAT_HELP,
        request={"multipart/form-data": ReleaseCreateSerializer, "application/json": ReleaseCreateSerializer},
        responses={201: FirmwareReleaseSerializer},
    )
    def create(self, request, *args, **kwargs):
        body = ReleaseCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        image = data.get("image")
        release = services.firmware_release_create(
            actor=request.user,
            model=data["model"],
            version=data["version"],
            image=image.file if image is not None else None,
            url=data.get("url", ""),
            sha256=data.get("sha256", ""),
            size=data.get("size"),
            notes=data.get("notes", ""),
            minimum_secure=data.get("minimum_secure", False),
        )
        out = FirmwareReleaseSerializer(release).data
        return Response(out, status=status.HTTP_201_CREATED, headers={"Location": out["url"]})

    @extend_schema(
        summary="Withdraw a release",
        description="No longer offered nor counted as the latest; open offers are cancelled; devices running it get "
        "a firmware_withdrawn alert.",
        request=WithdrawSerializer,
        responses={200: FirmwareReleaseSerializer},
    )
    @action(detail=True, methods=["post"], parser_classes=[JSONParser, FormParser])
    def withdraw(self, request, pk=None):
        return self._act(request, WithdrawSerializer, services.firmware_release_withdraw, "reason")

    @extend_schema(
        summary="Mark a release known-vulnerable",
        description="Devices running it get a critical firmware_vulnerable alert; it can no longer be offered.",
        request=VulnerableSerializer,
        responses={200: FirmwareReleaseSerializer},
    )
    @action(detail=True, methods=["post"], parser_classes=[JSONParser, FormParser])
    def vulnerable(self, request, pk=None):
        return self._act(request, VulnerableSerializer, services.firmware_release_mark_vulnerable, "advisory")

    def _act(self, request, body_class, service, argument: str) -> Response:
        """Withdraw and mark vulnerable: one text in, one service, the release out."""
        body = body_class(data=request.data)
        body.is_valid(raise_exception=True)
        release = service(actor=request.user, release=self._release(), **{argument: body.validated_data[argument]})
        return Response(FirmwareReleaseSerializer(release).data)

    @extend_schema(
        summary="Offer a release to devices",
        description="By `client_ids`, or by device-list `filters` with `confirm_count` (their number now; 400 says the "
        "current number when it differs). Devices of another model, revoked or decommissioned ones and devices "
        "already on the version are skipped. Each offer is published on rx/<id>/firmware; the device's ack "
        "(accepted, or rejected with its reason) is recorded on the offer. Answers 202.",
        request=OfferRequestSerializer,
        responses={202: OfferResultSerializer},
    )
    @action(detail=True, methods=["post"], parser_classes=[JSONParser])
    def offer(self, request, pk=None):
        body = OfferRequestSerializer(data=request.data if isinstance(request.data, dict) else {})
        body.is_valid(raise_exception=True)
        data = body.validated_data
        release = self._release()
        if "filters" in data:
            ids = list(selectors.offer_targets(release=release, filters=data["filters"]).values_list("id", flat=True))
            if data["confirm_count"] != len(ids):
                raise serializers.ValidationError(
                    {"confirm_count": f"The filters now match {len(ids)} device(s); send that number to confirm."}
                )
            result = services.firmware_offer(actor=request.user, release=release, device_ids=ids)
        else:
            from devices.models import Device

            ids = list(Device.objects.filter(client_id__in=data["client_ids"]).values_list("id", flat=True))
            result = services.firmware_offer(actor=request.user, release=release, device_ids=ids)
            unknown = len(set(data["client_ids"])) - len(ids)
            if unknown:
                result["skipped"]["unknown device"] = unknown
        out = {"offered": len(result["offered"]), "skipped": result["skipped"], "offers": result["offered"]}
        return Response(out, status=status.HTTP_202_ACCEPTED)


class SigningKeyView(APIView):
    required_permissions = {"GET": "devices.view_firmwaresigningkey"}

    @extend_schema(
        summary="The registry's public signing key",
        description="Ed25519, PEM. Build it into the device (fleetkeeper_device: DeviceClient(firmware_public_key=...)"
        "). 404 until the first key exists (the first release creates one).",
        responses={200: SigningKeySerializer},
    )
    def get(self, request):
        key = FirmwareSigningKey.objects.filter(active=True).first()
        if key is None:
            raise NotFound("No firmware signing key yet: the first release creates one (or an admin creates it).")
        return Response(SigningKeySerializer(key).data)


router = SimpleRouter()
router.register("firmware", FirmwareReleaseViewSet, basename="api-firmware")

urlpatterns = [
    path("firmware/signing-key/", SigningKeyView.as_view(), name="api-firmware-signing-key"),
    path("", include(router.urls)),
]
