"""Rotation campaign API (issue 7, "Campaigns"). Thin: parse, call security.rotation.campaigns, answer.

GET  /api/v1/rotation-campaigns/                      -> the campaigns, newest first (paginated)
POST /api/v1/rotation-campaigns/                      {name, reason, filters, confirm_count, kind?, canary_size?, ...}
                                                      -> 201 the campaign (send confirm_count wrong to be told it)
POST /api/v1/rotation-campaigns/preview/              {filters, kind?, canary_size?, wave_size?} -> the counts
GET  /api/v1/rotation-campaigns/<id>/                 -> state, waves with their counts, the rotation debt
POST /api/v1/rotation-campaigns/<id>/pause/ | resume/ | abort/  {reason?} -> the campaign (409 in the wrong state)
"""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.urls import path, reverse
from drf_spectacular.utils import extend_schema, extend_schema_field
from rest_framework import generics, serializers, status
from rest_framework.exceptions import NotFound
from rest_framework.parsers import JSONParser
from rest_framework.response import Response
from rest_framework.views import APIView

from fleet.api import StrictCharField
from security.models import RotationCampaign
from security.rotation import campaigns
from security.rotation import selectors as campaign_reads

VIEW = "devices.view_device"
CHANGE = campaigns.CHANGE_PERMISSION


class PreviewRequestSerializer(serializers.Serializer):
    filters = serializers.DictField(
        help_text="The device list's filters: search, status (a list), model, group, firmware, seen. Unknown names and "
        "invalid values are refused (never ignored). `{}`: the whole fleet."
    )
    kind = serializers.ChoiceField(choices=campaigns.KINDS, default="secret")
    canary_size = serializers.IntegerField(min_value=1, max_value=10_000, default=10)
    wave_size = serializers.IntegerField(min_value=1, max_value=50_000, default=1000)


class CreateRequestSerializer(PreviewRequestSerializer):
    name = StrictCharField(max_length=campaigns.MAX_NAME)
    reason = StrictCharField(max_length=campaigns.MAX_REASON)
    confirm_count = serializers.IntegerField(
        min_value=0, help_text="The number of devices that can rotate (the preview's `eligible`). Wrong: 400 says it."
    )
    min_confirm_ratio = serializers.FloatField(min_value=0, max_value=1, default=0.9)
    min_reconnect_ratio = serializers.FloatField(min_value=0, max_value=1, default=0.9)
    wave_timeout_seconds = serializers.IntegerField(min_value=1, max_value=7 * 86400, default=300)


class ActRequestSerializer(serializers.Serializer):
    reason = StrictCharField(max_length=campaigns.MAX_REASON, required=False, default="", allow_blank=True)


class PreviewSerializer(serializers.Serializer):
    filters = serializers.DictField()
    kind = serializers.CharField()
    matched = serializers.IntegerField()
    eligible = serializers.IntegerField(help_text="What confirm_count must be.")
    skipped = serializers.IntegerField()
    sample = serializers.ListField(child=serializers.CharField())
    waves = serializers.IntegerField()


class CampaignSerializer(serializers.ModelSerializer):
    url = serializers.SerializerMethodField()
    created_by = serializers.CharField(source="created_by_label")

    class Meta:
        model = RotationCampaign
        fields = [
            "id",
            "url",
            "name",
            "kind",
            "state",
            "pause_reason",
            "reason",
            "filters",
            "total",
            "canary_size",
            "wave_size",
            "min_confirm_ratio",
            "min_reconnect_ratio",
            "wave_timeout_seconds",
            "baseline",
            "created_by",
            "created",
            "started_at",
            "finished_at",
        ]

    def get_url(self, obj) -> str:
        return reverse("api-rotation-campaign-detail", args=[obj.pk])


class WaveSerializer(serializers.Serializer):
    number = serializers.IntegerField()
    canary = serializers.BooleanField()
    size = serializers.IntegerField()
    state = serializers.CharField()
    started_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)
    counts = serializers.DictField(child=serializers.IntegerField(), help_text="Rotations of the wave by state.")
    started = serializers.IntegerField()
    confirmed = serializers.IntegerField()
    completed = serializers.IntegerField()
    failed = serializers.IntegerField()
    result = serializers.DictField(help_text="Online share at start; rates, baselines and thresholds once judged.")


class DebtRowSerializer(serializers.Serializer):
    client_id = serializers.CharField()
    issued_at = serializers.DateTimeField()


class DebtSerializer(serializers.Serializer):
    total = serializers.IntegerField(help_text="Devices of the campaign still on a credential issued before it.")
    since = serializers.DateTimeField()
    oldest = DebtRowSerializer(many=True)


class CampaignDetailSerializer(CampaignSerializer):
    summary = serializers.SerializerMethodField()
    waves = serializers.SerializerMethodField()
    debt = serializers.SerializerMethodField()

    class Meta(CampaignSerializer.Meta):
        fields = [*CampaignSerializer.Meta.fields, "summary", "waves", "debt"]

    def get_summary(self, obj) -> dict:
        return campaign_reads.campaign_summary(obj)

    @extend_schema_field(WaveSerializer(many=True))
    def get_waves(self, obj) -> list[dict]:
        return WaveSerializer(campaign_reads.campaign_waves(obj), many=True).data

    @extend_schema_field(DebtSerializer)
    def get_debt(self, obj) -> dict:
        return DebtSerializer(campaign_reads.rotation_debt(obj, limit=50)).data


def _campaign(pk: int) -> RotationCampaign:
    campaign = RotationCampaign.objects.filter(pk=pk).first()
    if campaign is None:
        raise NotFound("There is no such rotation campaign.")
    return campaign


class CampaignListView(generics.ListAPIView):
    queryset = RotationCampaign.objects.none()  # for the schema; get_queryset reads through the selector
    serializer_class = CampaignSerializer
    required_permissions = {"GET": VIEW, "POST": CHANGE}
    filter_backends: list = []
    parser_classes = [JSONParser]  # filters are a JSON object; a form encoding would flatten them

    def get_queryset(self):
        return campaign_reads.campaign_list()

    @extend_schema(summary="Rotation campaigns, newest first")
    def get(self, request, *args, **kwargs):
        return super().get(request, *args, **kwargs)

    @extend_schema(
        summary="Start a rotation campaign",
        description="Fixes the devices that match the filters and can rotate (`confirm_count` must be their number, "
        "else 400 says it), plans the waves (a canary of `canary_size`, then waves of `wave_size`) and answers 201; "
        "a worker runs the waves and pauses the campaign on its own when a wave does worse than the baseline.",
        request=CreateRequestSerializer,
        responses={201: CampaignSerializer},
    )
    def post(self, request):
        body = CreateRequestSerializer(data=request.data if isinstance(request.data, dict) else {})
        body.is_valid(raise_exception=True)
        data = body.validated_data
        campaign = campaigns.campaign_create(
            actor=request.user,
            name=data["name"],
            kind=data["kind"],
            filters=data["filters"],
            reason=data["reason"],
            confirm_count=data["confirm_count"],
            options=campaigns.CampaignSettings.from_data(data),
        )
        out = CampaignSerializer(campaign).data
        return Response(out, status=status.HTTP_201_CREATED, headers={"Location": out["url"]})


class CampaignPreviewView(APIView):
    required_permissions = {"POST": CHANGE}
    parser_classes = [JSONParser]

    @extend_schema(
        summary="How many devices a campaign with these filters would rotate",
        request=PreviewRequestSerializer,
        responses={200: PreviewSerializer},
    )
    def post(self, request):
        body = PreviewRequestSerializer(data=request.data if isinstance(request.data, dict) else {})
        body.is_valid(raise_exception=True)
        data = body.validated_data
        preview = campaigns.campaign_preview(
            filters=data["filters"], kind=data["kind"], canary_size=data["canary_size"], wave_size=data["wave_size"]
        )
        return Response(PreviewSerializer(preview).data)


class CampaignDetailView(APIView):
    required_permissions = {"GET": VIEW}

    @extend_schema(
        summary="A rotation campaign: waves, progress, rotation debt", responses={200: CampaignDetailSerializer}
    )
    def get(self, request, pk: int):
        return Response(CampaignDetailSerializer(_campaign(pk)).data)


class _ActView(APIView):
    required_permissions = {"POST": CHANGE}
    parser_classes = [JSONParser]
    action_name = ""

    def post(self, request, pk: int):
        campaign = _campaign(pk)
        body = ActRequestSerializer(data=request.data if isinstance(request.data, dict) else {})
        body.is_valid(raise_exception=True)
        reason = body.validated_data["reason"]
        try:
            campaign = campaigns.campaign_act(
                actor=request.user, campaign=campaign, action=self.action_name, reason=reason
            )
        except ValidationError as exc:
            return Response({"detail": " ".join(exc.messages)}, status=status.HTTP_409_CONFLICT)
        return Response(CampaignSerializer(campaign).data)


def _act_schema(summary: str, description: str):
    return extend_schema(
        summary=summary,
        description=description + " 409 when the campaign is not in a state that allows it.",
        request=ActRequestSerializer,
        responses={200: CampaignSerializer},
    )


class CampaignPauseView(_ActView):
    action_name = "pause"

    @_act_schema("Pause a campaign", "No new wave starts; rotations already sent carry on.")
    def post(self, request, pk: int):
        return super().post(request, pk)


class CampaignResumeView(_ActView):
    action_name = "resume"

    @_act_schema("Resume a paused campaign", "The next wave starts (a held wave stays held: it was judged).")
    def post(self, request, pk: int):
        return super().post(request, pk)


class CampaignAbortView(_ActView):
    action_name = "abort"

    @_act_schema(
        "Abort a campaign",
        "No more waves; the campaign's rotations that have not switched yet are cancelled (devices keep their old "
        "credential).",
    )
    def post(self, request, pk: int):
        return super().post(request, pk)


# Included at /api/v1/rotation-campaigns/ by security/api/urls.py.
urlpatterns = [
    path("", CampaignListView.as_view(), name="api-rotation-campaign-list"),
    path("preview/", CampaignPreviewView.as_view(), name="api-rotation-campaign-preview"),
    path("<int:pk>/", CampaignDetailView.as_view(), name="api-rotation-campaign-detail"),
    path("<int:pk>/pause/", CampaignPauseView.as_view(), name="api-rotation-campaign-pause"),
    path("<int:pk>/resume/", CampaignResumeView.as_view(), name="api-rotation-campaign-resume"),
    path("<int:pk>/abort/", CampaignAbortView.as_view(), name="api-rotation-campaign-abort"),
]
