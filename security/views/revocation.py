"""Pages for revocation and quarantine (issue 5): the confirm pages for one device (also the target of an alert's
"Revoke" / "Quarantine" link: /devices/<client_id>/revoke/?alert=<id>), the device page's security panel as a
fragment (it polls itself while an action is pending), and bulk actions with a preview, a typed confirmation and
progress."""

from __future__ import annotations

from django import forms
from django.contrib import messages
from django.core.exceptions import ValidationError
from django.http import Http404, QueryDict
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views import View

from devices.models import Device
from fleet.forms import add_service_errors
from security import revocation
from security.models import BulkAction
from security.permissions import RoleRequiredMixin, user_can
from security.services import _TRANSITIONS

ACTION_TEXT = {
    "revoke": {
        "title": "Revoke",
        "button": "Revoke device",
        "what": "Permanent. The device's secret is deleted, the broker drops its live connection at once and refuses "
        "every reconnection. Bringing it back later needs a reinstatement and a new secret.",
    },
    "quarantine": {
        "title": "Quarantine",
        "button": "Quarantine device",
        "what": "The device stays connected but keeps only its repair path: it can receive new credentials and "
        "firmware (rx/<id>/credentials, rx/<id>/firmware) and acknowledge them (tx/<id>/ack). It can no longer "
        "publish telemetry or status, nor receive commands or configuration.",
    },
    "reinstate": {
        "title": "Reinstate",
        "button": "Reinstate device",
        "what": "The device gets its full access back.",
    },
}


class ActionForm(forms.Form):
    reason = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 3}),
        max_length=revocation.MAX_REASON_LENGTH,
        help_text="Required. It goes into the audit log and onto the device page.",
    )
    confirm = forms.BooleanField(label="I have checked that this is the right device.")
    alert = forms.IntegerField(required=False, min_value=1, widget=forms.HiddenInput)


class DeviceActionView(RoleRequiredMixin, View):
    action_name = ""

    def get_permission_required(self):
        return _TRANSITIONS[self.action_name][2]

    def render_page(self, device, form, status=200, error=""):
        allowed = device.status in _TRANSITIONS[self.action_name][0]
        return render(
            self.request,
            "security/revocation_confirm.html",
            {
                "device": device,
                "form": form,
                "action": self.action_name,
                "text": ACTION_TEXT[self.action_name],
                "allowed": allowed,
                "error": error,
                "has_credential": hasattr(device, "credential"),
                "can_issue": user_can(self.request.user, "devices.issue_credentials"),
            },
            status=status,
        )

    def get(self, request, client_id):
        device = get_object_or_404(Device, client_id=client_id)
        alert = request.GET.get("alert", "")
        initial = {"alert": alert} if alert.isdigit() else {}
        if alert.isdigit():
            initial["reason"] = f"Alert #{alert}"
        return self.render_page(device, ActionForm(initial=initial))

    def post(self, request, client_id):
        device = get_object_or_404(Device, client_id=client_id)
        form = ActionForm(request.POST)
        if not form.is_valid():
            return self.render_page(device, form, status=400)
        try:
            record = revocation.device_action_request(
                actor=request.user,
                device=device,
                action=self.action_name,
                reason=form.cleaned_data["reason"],
                alert_id=form.cleaned_data.get("alert"),
            )
        except ValidationError as exc:
            return self.render_page(device, form, status=409, error=" ".join(exc.messages))
        if self.action_name == "reinstate" and record.device and not hasattr(record.device, "credential"):
            messages.warning(
                request,
                f"{client_id} is reinstated but has no secret (revoking deleted it): issue a new secret below and "
                "deliver it to the device.",
            )
        else:
            messages.success(
                request, f"{client_id}: {self.action_name} requested. The security panel shows when it is verified."
            )
        return redirect("device-detail", client_id=client_id)


class DeviceRevokeView(DeviceActionView):
    action_name = "revoke"


class DeviceQuarantineView(DeviceActionView):
    action_name = "quarantine"


class DeviceReinstateView(DeviceActionView):
    action_name = "reinstate"


class DeviceSecurityPanelView(RoleRequiredMixin, View):
    """The device page's security panel alone: it polls this while an action waits for verification."""

    permission_required = "devices.view_device"

    def get(self, request, client_id):
        device = get_object_or_404(Device.objects.select_related("model"), client_id=client_id)
        return render(request, "security/_device_panel.html", {"device": device})


# --- bulk ----------------------------------------------------------------------------------------------------------


class BulkForm(forms.Form):
    reason = forms.CharField(widget=forms.Textarea(attrs={"rows": 3}), max_length=revocation.MAX_REASON_LENGTH)
    confirm_count = forms.CharField(
        label="Type the number of devices to confirm",
        max_length=12,
        widget=forms.TextInput(attrs={"autocomplete": "off"}),
    )


def _filters_query(filters: dict) -> str:
    query = QueryDict(mutable=True)
    for key, value in filters.items():
        if isinstance(value, list):
            query.setlist(key, value)
        else:
            query[key] = value
    return query.urlencode()


class BulkNewView(RoleRequiredMixin, View):
    """GET /bulk-actions/new/?action=revoke&<device-list filters>: the preview and the form; POST: start it."""

    def get_action(self) -> str:
        action = (self.request.POST or self.request.GET).get("action", "revoke")
        if action not in revocation.BULK_ACTIONS:
            raise Http404("Bulk actions are revoke and quarantine.")
        return action

    def get_permission_required(self):
        return _TRANSITIONS[self.get_action()][2]

    def _filters(self, source) -> tuple[dict, str]:
        params = source.copy()
        for key in ("action", "reason", "confirm_count", "csrfmiddlewaretoken"):
            params.pop(key, None)
        try:
            return revocation.bulk_filters_clean(params), ""
        except ValidationError as exc:
            return {}, " ".join(exc.messages)

    def render_page(self, action, filters, form, *, error="", status=200):
        preview = revocation.bulk_preview(action=action, filters=filters) if not error else None
        return render(
            self.request,
            "security/bulk_new.html",
            {
                "action": action,
                "text": ACTION_TEXT[action],
                "filters": filters,
                "filters_query": _filters_query(filters),
                "preview": preview,
                "form": form,
                "error": error,
                "whole_fleet": not filters,
                "section": "devices",
            },
            status=status,
        )

    def get(self, request):
        action = self.get_action()
        filters, error = self._filters(request.GET)
        return self.render_page(action, filters, BulkForm(), error=error, status=400 if error else 200)

    def post(self, request):
        action = self.get_action()
        filters, error = self._filters(request.POST)
        form = BulkForm(request.POST)
        if error:
            return self.render_page(action, filters, form, error=error, status=400)
        if not form.is_valid():
            return self.render_page(action, filters, form, status=400)
        try:
            bulk = revocation.bulk_action_create(
                actor=request.user,
                action=action,
                filters=filters,
                reason=form.cleaned_data["reason"],
                confirm_count=form.cleaned_data["confirm_count"],
            )
        except ValidationError as exc:
            add_service_errors(form, exc)
            return self.render_page(action, filters, form, status=400)
        return redirect("bulk-action-detail", pk=bulk.pk)


class BulkDetailView(RoleRequiredMixin, View):
    """Progress (htmx polls the status fragment every second until the job and its verification are done)."""

    permission_required = "devices.view_device"

    def get(self, request, pk):
        bulk = BulkAction.objects.defer("device_ids").filter(pk=pk).first()
        if bulk is None:
            raise Http404("There is no such bulk action.")
        counts = revocation.bulk_action_counts(bulk)
        waiting = counts["pending"] + counts["failed"]
        context = {
            "bulk": bulk,
            "counts": counts,
            "sessions": revocation.bulk_action_session_counts(bulk) if bulk.action == "revoke" else None,
            "settled": bulk.done and not waiting,
            "filters_query": _filters_query(bulk.filters),
            "poll_url": reverse("bulk-action-detail", args=[bulk.pk]),
        }
        fragment = request.headers.get("HX-Request") == "true"
        template = "security/bulk_status_fragment.html" if fragment else "security/bulk_detail.html"
        return render(request, template, context)
