"""Alert pages: the list (filters, live refresh with htmx polling), the detail with its evidence, acknowledge and
resolve with a comment, and two fragments other pages load: the overview card and a device's open alerts."""

from __future__ import annotations

import json

from django.conf import settings
from django.contrib import messages
from django.core.exceptions import ValidationError
from django.core.paginator import Paginator
from django.shortcuts import get_object_or_404, redirect, render
from django.views import View

from security.detection.alerts import KINDS, alert_acknowledge, alert_resolve
from security.detection.filtersets import AlertFilterSet
from security.detection.selectors import alert_chart, alert_list, alert_open_by_severity
from security.models import Alert
from security.permissions import RoleRequiredMixin, user_can


class AlertListView(RoleRequiredMixin, View):
    permission_required = "security.view_alert"
    http_method_names = ["get", "head", "options"]

    def get(self, request):
        filters = request.GET.copy()
        if "state" not in filters and not request.GET.get("all"):
            filters.setlist("state", [Alert.State.OPEN, Alert.State.ACKNOWLEDGED])
        queryset = alert_list(user=request.user, filters=filters)
        page = Paginator(queryset, settings.FLEET_PAGE_SIZE).get_page(request.GET.get("page"))
        context = {
            "filterset": AlertFilterSet(filters, queryset=Alert.objects.none()),
            "page": page,
            "alerts": page.object_list,
            "kinds": sorted(KINDS.values(), key=lambda k: k.kind),
            "query": request.GET.urlencode(),
            "section": "alerts",
        }
        if request.headers.get("HX-Request"):
            return render(request, "security/_alerts_table.html", context)
        return render(request, "security/alert_list.html", context)


class AlertDetailView(RoleRequiredMixin, View):
    permission_required = "security.view_alert"
    http_method_names = ["get", "head", "options"]

    def get(self, request, pk: int):
        alert = get_object_or_404(Alert.objects.select_related("device", "acknowledged_by", "resolved_by"), pk=pk)
        return render(
            request,
            "security/alert_detail.html",
            {
                "alert": alert,
                "spec": KINDS.get(alert.kind),
                "evidence_json": json.dumps(alert.evidence, indent=2, sort_keys=True, default=str),
                "response_json": json.dumps(alert.response, indent=2, sort_keys=True, default=str)
                if alert.response
                else "",
                "can_act": user_can(request.user, "security.change_alert"),
                "can_quarantine": user_can(request.user, "devices.quarantine_device"),
                "section": "alerts",
            },
        )


class AlertActView(RoleRequiredMixin, View):
    permission_required = "security.change_alert"
    http_method_names = ["post"]
    action = "acknowledge"

    def post(self, request, pk: int):
        alert = get_object_or_404(Alert, pk=pk)
        service = alert_acknowledge if self.action == "acknowledge" else alert_resolve
        try:
            service(actor=request.user, alert=alert, comment=request.POST.get("comment", "")[:2000])
        except ValidationError as exc:
            for message in exc.messages:
                messages.error(request, message)
        else:
            messages.success(request, f"Alert #{alert.pk} {self.action}d.")
        return redirect("alert-detail", pk=alert.pk)


class AlertOverviewCardView(RoleRequiredMixin, View):
    """The overview's alert card (loaded and refreshed by htmx)."""

    permission_required = "security.view_alert"
    http_method_names = ["get"]

    def get(self, request):
        return render(
            request,
            "security/_alerts_card.html",
            {"by_severity": alert_open_by_severity(), "chart": alert_chart(hours=24)},
        )


class DeviceAlertsFragmentView(RoleRequiredMixin, View):
    """A device's unresolved alerts, for the device page."""

    permission_required = "security.view_alert"
    http_method_names = ["get"]

    def get(self, request, client_id: str):
        alerts = list(
            alert_list(user=request.user, filters={"device": client_id, "state": ["open", "acknowledged"]})[:20]
        )
        return render(request, "security/_alerts_device.html", {"alerts": alerts, "client_id": client_id})
