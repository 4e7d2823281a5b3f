"""GET /api/v1/posture/ (the latest report, the run in progress, a link to the history),
GET /api/v1/posture/reports/ (the history) and POST /api/v1/posture/run/ (operator, admin; audited)."""

from django.urls import reverse
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from security.models import PostureReport
from security.posture import services as posture


class PostureReportSummarySerializer(serializers.ModelSerializer):
    actor = serializers.CharField(source="actor_label")

    class Meta:
        model = PostureReport
        fields = ["id", "state", "trigger", "actor", "created", "started", "finished", "duration_ms", "summary"]
        read_only_fields = fields


class PostureReportSerializer(PostureReportSummarySerializer):
    findings = serializers.JSONField(
        help_text="Each: id, title, severity, status (fail/pass/unknown), evidence, fix, duration_ms."
    )
    target = serializers.JSONField()
    progress = serializers.JSONField(help_text="{done, total, current} while it runs.")

    class Meta(PostureReportSummarySerializer.Meta):
        fields = [*PostureReportSummarySerializer.Meta.fields, "target", "progress", "findings", "error"]
        read_only_fields = fields


class PostureSerializer(serializers.Serializer):
    latest = PostureReportSerializer(allow_null=True)
    changes = serializers.JSONField(help_text="Checks whose status changed since the run before the latest.")
    running = PostureReportSerializer(allow_null=True)
    history = serializers.CharField(help_text="Where the list of runs is.")


class PostureView(APIView):
    required_permissions = {"GET": "security.view_posturereport"}

    @extend_schema(summary="The latest posture audit", responses={200: PostureSerializer})
    def get(self, request):
        latest = posture.posture_latest()
        running = (
            PostureReport.objects.filter(state__in=[PostureReport.State.QUEUED, PostureReport.State.RUNNING])
            .order_by("-created")
            .first()
        )
        changes = posture.posture_changes(latest, posture.posture_previous(latest)) if latest else []
        return Response(
            {
                "latest": PostureReportSerializer(latest).data if latest else None,
                "changes": changes,
                "running": PostureReportSerializer(running).data if running else None,
                "history": request.build_absolute_uri(reverse("api-posture-reports")),
            }
        )


class PostureReportListView(APIView):
    required_permissions = {"GET": "security.view_posturereport"}

    @extend_schema(
        summary="Posture audit runs, newest first", responses={200: PostureReportSummarySerializer(many=True)}
    )
    def get(self, request):
        return Response(PostureReportSummarySerializer(posture.posture_history(limit=100), many=True).data)


class PostureRunView(APIView):
    required_permissions = {"POST": "security.run_posture_audit"}

    @extend_schema(
        summary="Run the posture audit now",
        description="Queues a run of the console's broker audit (or returns the one already queued or running). "
        "Poll GET /api/v1/posture/ for its progress.",
        request=None,
        responses={202: PostureReportSerializer},
    )
    def post(self, request):
        report, _created = posture.posture_request(actor=request.user, trigger=PostureReport.Trigger.API)
        return Response(PostureReportSerializer(report).data, status=status.HTTP_202_ACCEPTED)
