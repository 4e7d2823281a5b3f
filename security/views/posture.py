"""The posture audit page (latest report by severity, history, changes since the previous run, "Run now" with
progress), its progress fragment and the overview card. Thin: security/posture/services.py does the work."""

from django.contrib import messages
from django.shortcuts import get_object_or_404, redirect, render
from django.views import View

from security.models import PostureReport
from security.permissions import RoleRequiredMixin, user_can
from security.posture import services as posture


def _running() -> PostureReport | None:
    return (
        PostureReport.objects.filter(state__in=[PostureReport.State.QUEUED, PostureReport.State.RUNNING])
        .order_by("-created")
        .first()
    )


class PostureView(RoleRequiredMixin, View):
    permission_required = "security.view_posturereport"

    def get(self, request, pk: int | None = None):
        report = get_object_or_404(PostureReport, pk=pk) if pk else posture.posture_latest()
        previous = posture.posture_previous(report) if report and report.state == PostureReport.State.DONE else None
        return render(
            request,
            "security/posture.html",
            {
                "report": report,
                "groups": posture.findings_by_severity(report) if report else [],
                "previous": previous,
                "changes": posture.posture_changes(report, previous) if report else [],
                "history": posture.posture_history(limit=30),
                "running": _running(),
                "can_run": user_can(request.user, "security.run_posture_audit"),
                "section": "posture",
            },
        )


class PostureRunView(RoleRequiredMixin, View):
    permission_required = "security.run_posture_audit"
    http_method_names = ["post"]

    def post(self, request):
        report, created = posture.posture_request(actor=request.user, trigger=PostureReport.Trigger.UI)
        if created:
            messages.success(request, "The posture audit is queued; its progress shows below while a worker runs it.")
        else:
            messages.info(request, f"A posture audit is already {report.state}; its progress shows below.")
        return redirect("posture")


class PostureProgressView(RoleRequiredMixin, View):
    """Polled by the page while a run is queued or running; tells the page to reload when it is done."""

    permission_required = "security.view_posturereport"

    def get(self, request, pk: int):
        report = get_object_or_404(PostureReport, pk=pk)
        response = render(request, "security/_posture_progress.html", {"running": report})
        if report.state in (PostureReport.State.DONE, PostureReport.State.FAILED):
            response["HX-Refresh"] = "true"
        return response


class PostureOverviewCardView(RoleRequiredMixin, View):
    permission_required = "security.view_posturereport"

    def get(self, request):
        return render(
            request, "security/_posture_card.html", {"report": posture.posture_latest(), "running": _running()}
        )
