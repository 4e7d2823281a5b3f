"""Pages for rotation campaigns (issue 7, "Campaigns"): the list, the new-campaign page (device-list filters, a
preview count and a typed confirmation), the campaign page (progress per wave, live; the rotation debt) and the
operator's pause, resume and abort."""

from __future__ import annotations

from django import forms
from django.contrib import messages
from django.core.exceptions import ValidationError
from django.core.paginator import Paginator
from django.http import Http404
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views import View

from fleet.forms import add_service_errors
from security.models import RotationCampaign
from security.permissions import RoleRequiredMixin, user_can
from security.rotation import campaigns
from security.rotation import selectors as campaign_reads
from security.views.revocation import _filters_query

VIEW_PERMISSION = "devices.view_device"
# Form fields that are not device-list filters.
NON_FILTER_KEYS = (
    "name",
    "kind",
    "reason",
    "confirm_count",
    "canary_size",
    "wave_size",
    "min_confirm_ratio",
    "min_reconnect_ratio",
    "wave_timeout_seconds",
    "csrfmiddlewaretoken",
)


class CampaignForm(forms.Form):
    name = forms.CharField(max_length=campaigns.MAX_NAME)
    # Fixed by the preview (its link switches between the two), so the typed number matches what was shown.
    kind = forms.ChoiceField(choices=[(k, k) for k in campaigns.KINDS], initial="secret", widget=forms.HiddenInput)
    reason = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 2}), max_length=campaigns.MAX_REASON, help_text="Goes into the audit log."
    )
    canary_size = forms.IntegerField(min_value=1, max_value=10_000, initial=10, label="Canary wave (devices)")
    wave_size = forms.IntegerField(min_value=1, max_value=50_000, initial=1000, label="Then waves of (devices)")
    min_confirm_ratio = forms.FloatField(
        min_value=0,
        max_value=1,
        initial=0.9,
        label="Pause when confirmations fall below this share of the baseline",
        help_text="Baseline: the share of the wave's devices online when it starts.",
    )
    min_reconnect_ratio = forms.FloatField(
        min_value=0,
        max_value=1,
        initial=0.9,
        label="Pause when reconnects fall below this share of the baseline",
        help_text="Baseline: the fleet's recent reconnect rate after a rotation (secrets only).",
    )
    wave_timeout_seconds = forms.IntegerField(
        min_value=1, max_value=7 * 86400, initial=300, label="Judge a wave after at most (seconds)"
    )
    confirm_count = forms.CharField(
        label="Type the number of devices to confirm",
        max_length=12,
        widget=forms.TextInput(attrs={"autocomplete": "off"}),
    )


def _int(value, default: int) -> int:
    try:
        return max(1, int(value))
    except (TypeError, ValueError):
        return default


class CampaignListView(RoleRequiredMixin, View):
    permission_required = VIEW_PERMISSION

    def get(self, request):
        page = Paginator(campaign_reads.campaign_list(), 25).get_page(request.GET.get("page"))
        for campaign in page:
            campaign.badge = BADGE.get(campaign.state, "")
        return render(
            request,
            "security/campaign_list.html",
            {
                "page": page,
                "can_change": user_can(request.user, campaigns.CHANGE_PERMISSION),
                "section": "devices",
            },
        )


class CampaignNewView(RoleRequiredMixin, View):
    """GET /rotation-campaigns/new/?<device-list filters>&kind=secret: the preview and the form; POST: create."""

    permission_required = campaigns.CHANGE_PERMISSION

    def _filters(self, source) -> tuple[dict, str]:
        params = source.copy()
        for key in NON_FILTER_KEYS:
            params.pop(key, None)
        try:
            return campaigns.bulk_filters_clean(params), ""
        except ValidationError as exc:
            return {}, " ".join(exc.messages)

    def render_page(self, filters, form, *, kind="secret", error="", status=200):
        preview = None
        if not error:
            data = form.data if form.is_bound else {}
            preview = campaigns.campaign_preview(
                filters=filters,
                kind=kind,
                canary_size=_int(data.get("canary_size"), 10),
                wave_size=_int(data.get("wave_size"), 1000),
            )
        return render(
            self.request,
            "security/campaign_new.html",
            {
                "filters": filters,
                "filters_query": _filters_query(filters),
                "preview": preview,
                "form": form,
                "kind": kind,
                "error": error,
                "whole_fleet": not filters,
                "section": "devices",
            },
            status=status,
        )

    def _kind(self, source) -> str:
        kind = source.get("kind", "secret")
        return kind if kind in campaigns.KINDS else "secret"

    def get(self, request):
        filters, error = self._filters(request.GET)
        kind = self._kind(request.GET)
        form = CampaignForm(initial={"kind": kind})
        return self.render_page(filters, form, kind=kind, error=error, status=400 if error else 200)

    def post(self, request):
        filters, error = self._filters(request.POST)
        kind = self._kind(request.POST)
        form = CampaignForm(request.POST)
        if error:
            return self.render_page(filters, form, kind=kind, error=error, status=400)
        if not form.is_valid():
            return self.render_page(filters, form, kind=kind, status=400)
        data = form.cleaned_data
        try:
            campaign = campaigns.campaign_create(
                actor=request.user,
                name=data["name"],
                kind=data["kind"],
                filters=filters,
                reason=data["reason"],
                confirm_count=data["confirm_count"],
                options=campaigns.CampaignSettings.from_data(data),
            )
        except ValidationError as exc:
            add_service_errors(form, exc)
            return self.render_page(filters, form, kind=kind, status=400)
        messages.success(request, f"Campaign “{campaign.name}” created: the canary wave starts now.")
        return redirect("rotation-campaign-detail", pk=campaign.pk)


# The stylesheet's badge colours: green done, amber under way, red stopped.
BADGE = {
    "completed": "state-succeeded",
    "passed": "state-succeeded",
    "pending": "state-pending",
    "running": "state-pending",
    "paused": "state-failed",
    "held": "state-failed",
    "aborted": "state-failed",
}


def campaign_context(campaign: RotationCampaign, user) -> dict:
    waves = campaign_reads.campaign_waves(campaign)
    for wave in waves:
        wave["badge"] = BADGE.get(wave["state"], "")
    summary = campaign_reads.campaign_summary(campaign)
    live = campaign.state in (RotationCampaign.State.PENDING, RotationCampaign.State.RUNNING)
    return {
        "campaign": campaign,
        "badge": BADGE.get(campaign.state, ""),
        "waves": waves,
        "summary": summary,
        "debt": campaign_reads.rotation_debt(campaign, limit=25),
        "live": live,
        "percent": round(100 * summary["started"] / campaign.total) if campaign.total else 100,
        "can_change": user_can(user, campaigns.CHANGE_PERMISSION),
        "filters_query": _filters_query(campaign.filters),
        "poll_url": reverse("rotation-campaign-detail", args=[campaign.pk]),
    }


class CampaignDetailView(RoleRequiredMixin, View):
    """Progress per wave; htmx polls the status fragment every 2 s while the campaign is pending or running."""

    permission_required = VIEW_PERMISSION

    def get(self, request, pk):
        campaign = RotationCampaign.objects.filter(pk=pk).first()
        if campaign is None:
            raise Http404("There is no such rotation campaign.")
        fragment = request.headers.get("HX-Request") == "true"
        template = "security/campaign_status_fragment.html" if fragment else "security/campaign_detail.html"
        return render(request, template, {**campaign_context(campaign, request.user), "section": "devices"})


DONE = {
    "pause": "Paused: no new wave starts. Rotations already sent carry on.",
    "resume": "Resumed: the next wave starts now.",
    "abort": "Aborted: rotations not yet switched were cancelled; devices keep their old credential.",
}


class CampaignActView(RoleRequiredMixin, View):
    """POST pause / resume / abort."""

    permission_required = campaigns.CHANGE_PERMISSION
    action = ""

    def post(self, request, pk):
        campaign = RotationCampaign.objects.filter(pk=pk).first()
        if campaign is None:
            raise Http404("There is no such rotation campaign.")
        reason = request.POST.get("reason", "")[: campaigns.MAX_REASON]
        try:
            campaigns.campaign_act(actor=request.user, campaign=campaign, action=self.action, reason=reason)
            messages.success(request, DONE[self.action])
        except ValidationError as exc:
            messages.error(request, " ".join(exc.messages))
        return redirect("rotation-campaign-detail", pk=pk)
