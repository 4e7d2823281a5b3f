"""Pages for credential rotation (issue 7): rotate one device (confirm page), the device page's rotation history (an
htmx fragment), the rotation list, rotating a filtered set of devices (preview + typed count), the overview card,
and the rotation policies with their schedules (django-celery-beat entries an operator changes here)."""

from __future__ import annotations

from django import forms
from django.contrib import messages
from django.core.exceptions import ValidationError
from django.core.paginator import Paginator
from django.http import Http404
from django.shortcuts import get_object_or_404, redirect, render
from django.views import View
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from devices.models import Device, DeviceGroup, DeviceModel
from fleet.forms import add_service_errors
from security import revocation
from security.confirmation import typed_count_check
from security.models import CredentialRotation, RotationPolicy
from security.permissions import RoleRequiredMixin, user_can
from security.rotation import policies
from security.rotation import services as rotation
from security.rotation.selectors import (
    RotationFilterSet,
    device_rotations,
    policy_list,
    rotation_counts,
    rotation_queryset,
)
from security.views.revocation import _filters_query

ROTATE = "devices.rotate_credentials"
WHAT = (
    "A new 256-bit secret is sent to the device on rx/<id>/credentials. The device stores it, keeps its old one and "
    "confirms; only then does the broker switch to the new secret (the device is reconnected at once and logs in "
    "with it). Until the device confirms, the old secret keeps working; a device that never confirms keeps it and "
    "raises an alert when the grace period ends. Certificate devices are asked for a new CSR instead."
)


class RotateForm(forms.Form):
    confirm = forms.BooleanField(label="I have checked that this is the right device.")


class DeviceRotateView(RoleRequiredMixin, View):
    permission_required = ROTATE

    def render_page(self, device, form, *, error="", status=200):
        current = CredentialRotation.objects.filter(device=device, state__in=CredentialRotation.OPEN_STATES).first()
        return render(
            self.request,
            "security/rotation_confirm.html",
            {
                "device": device,
                "form": form,
                "error": error,
                "current": current,
                "policy": rotation.policy_for_device(device),
                "what": WHAT,
                "has_credential": hasattr(device, "credential"),
                "section": "devices",
            },
            status=status,
        )

    def get(self, request, client_id):
        device = get_object_or_404(Device.objects.select_related("model"), client_id=client_id)
        return self.render_page(device, RotateForm())

    def post(self, request, client_id):
        device = get_object_or_404(Device.objects.select_related("model"), client_id=client_id)
        form = RotateForm(request.POST)
        if not form.is_valid():
            return self.render_page(device, form, status=400)
        try:
            started = rotation.rotation_start(actor=request.user, device=device, trigger="manual")
        except ValidationError as exc:
            return self.render_page(device, form, error=" ".join(exc.messages), status=409)
        messages.success(
            request,
            f"{client_id}: rotation #{started.pk} started. Its steps appear under “Credential rotation” as the device "
            "confirms and the broker switches.",
        )
        return redirect("device-detail", client_id=client_id)


class DeviceRotationsFragmentView(RoleRequiredMixin, View):
    """The device page's rotation history, loaded (and refreshed while one is open) by htmx."""

    permission_required = "security.view_credentialrotation"

    def get(self, request, client_id):
        device = get_object_or_404(Device, client_id=client_id)
        rows = device_rotations(client_id=client_id)
        return render(
            request,
            "security/_rotation_device.html",
            {
                "device": device,
                "rotations": rows,
                "open": next((r for r in rows if r.is_open), None),
                "can_rotate": user_can(request.user, ROTATE),
            },
        )


class RotationCancelView(RoleRequiredMixin, View):
    permission_required = ROTATE

    def post(self, request, pk):
        row = get_object_or_404(CredentialRotation, pk=pk)
        try:
            rotation.rotation_cancel(actor=request.user, rotation=row, reason=request.POST.get("reason", "")[:500])
        except ValidationError as exc:
            messages.error(request, " ".join(exc.messages))
        else:
            messages.success(request, f"Rotation #{row.pk} of {row.client_id} cancelled; the old secret stays.")
        return redirect("device-detail", client_id=row.client_id)


class RotationListView(RoleRequiredMixin, View):
    permission_required = "security.view_credentialrotation"

    def get(self, request):
        filterset = RotationFilterSet(request.GET or None, queryset=rotation_queryset())
        page = Paginator(filterset.qs, 50).get_page(request.GET.get("page"))
        query = request.GET.copy()
        query.pop("page", None)
        return render(
            request,
            "security/rotation_list.html",
            {
                "filterset": filterset,
                "page": page,
                "counts": rotation_counts(),
                "query": query.urlencode(),
                "can_rotate": user_can(request.user, ROTATE),
                "section": "devices",
            },
        )


class RotationOverviewCardView(RoleRequiredMixin, View):
    permission_required = "security.view_credentialrotation"

    def get(self, request):
        return render(request, "security/_rotation_card.html", {"counts": rotation_counts()})


# --- a filtered set of devices -----------------------------------------------------------------------------------


class BulkRotateForm(forms.Form):
    confirm_count = forms.CharField(
        label="Type the number of devices to confirm",
        max_length=12,
        widget=forms.TextInput(attrs={"autocomplete": "off"}),
    )


def _bulk_candidates(filters: dict):
    """Devices the filters match that can rotate now: active or quarantined, with a credential or an active
    certificate, without a rotation in progress."""
    from django.db.models import Exists, OuterRef, Q

    from security.models import DeviceCertificate

    queryset = revocation.bulk_queryset(filters)
    return (
        queryset.filter(status__in=rotation.ROTATABLE_STATUSES)
        .filter(
            Q(credential__isnull=False)
            | Exists(DeviceCertificate.objects.filter(device=OuterRef("pk"), status="active"))
        )
        .exclude(
            Exists(CredentialRotation.objects.filter(device=OuterRef("pk"), state__in=CredentialRotation.OPEN_STATES))
        )
    )


class BulkRotateView(RoleRequiredMixin, View):
    """GET /rotations/bulk/?<device-list filters>: the preview; POST with the typed count: start them."""

    permission_required = ROTATE
    SKIP = ("confirm_count", "csrfmiddlewaretoken", "page")

    def _filters(self, source) -> tuple[dict, str]:
        params = source.copy()
        for key in self.SKIP:
            params.pop(key, None)
        try:
            return revocation.bulk_filters_clean(params), ""
        except ValidationError as exc:
            return {}, " ".join(exc.messages)

    def render_page(self, filters, form, *, error="", status=200):
        preview = None
        if not error:
            candidates = _bulk_candidates(filters)
            matched = revocation.bulk_queryset(filters).count()
            eligible = candidates.count()
            preview = {
                "matched": matched,
                "eligible": eligible,
                "unchanged": matched - eligible,
                "sample": list(candidates.order_by("client_id").values_list("client_id", flat=True)[:5]),
            }
        return render(
            self.request,
            "security/rotation_bulk.html",
            {
                "filters": filters,
                "filters_query": _filters_query(filters),
                "preview": preview,
                "form": form,
                "error": error,
                "whole_fleet": not filters,
                "what": WHAT,
                "section": "devices",
            },
            status=status,
        )

    def get(self, request):
        filters, error = self._filters(request.GET)
        return self.render_page(filters, BulkRotateForm(), error=error, status=400 if error else 200)

    def post(self, request):
        filters, error = self._filters(request.POST)
        form = BulkRotateForm(request.POST)
        if error or not form.is_valid():
            return self.render_page(filters, form, error=error, status=400)
        client_ids = list(_bulk_candidates(filters).order_by("client_id").values_list("client_id", flat=True))
        try:
            typed_count_check(typed=form.cleaned_data["confirm_count"], matched=len(client_ids), can="can rotate now")
        except ValidationError as exc:
            form.add_error(None, exc)
            return self.render_page(filters, form, status=400)
        started = rotation.rotation_start_many(actor=request.user, client_ids=client_ids, trigger="manual")
        messages.success(
            request, f"{started} rotation(s) started. This list shows them as the devices confirm and switch."
        )
        return redirect("/rotations/?open=true")


# --- policies and their schedules -----------------------------------------------------------------------------------


class PolicyForm(forms.ModelForm):
    schedule_kind = forms.ChoiceField(
        choices=[("interval", "Every …"), ("crontab", "Crontab line (UTC)")], initial="interval", label="Schedule"
    )
    every = forms.IntegerField(min_value=1, required=False, initial=1)
    period = forms.ChoiceField(
        choices=[
            (IntervalSchedule.MINUTES, "minutes"),
            (IntervalSchedule.HOURS, "hours"),
            (IntervalSchedule.DAYS, "days"),
        ],
        initial=IntervalSchedule.HOURS,
        required=False,
    )
    crontab = forms.CharField(
        required=False, max_length=120, help_text="minute hour day-of-month month day-of-week, e.g. 0 3 * * *"
    )

    class Meta:
        model = RotationPolicy
        fields = list(policies.POLICY_FIELDS)

    def __init__(self, *args, editing: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["device_model"].queryset = DeviceModel.objects.order_by("name")
        self.fields["group"].queryset = DeviceGroup.objects.order_by("name")
        if editing:
            self.fields["scope"].disabled = True
        schedule = policies.schedule_of(self.instance.periodic_task) if self.instance.pk else None
        if schedule is not None and not self.is_bound:
            self.initial.update(
                schedule_kind=schedule.kind, every=schedule.every, period=schedule.period, crontab=schedule.crontab
            )

    def schedule(self) -> policies.Schedule:
        data = self.cleaned_data
        return policies.schedule_parse(
            kind=data.get("schedule_kind") or "interval",
            every=data.get("every"),
            period=data.get("period") or "",
            crontab=data.get("crontab") or "",
        )

    def policy_data(self) -> dict:
        return {name: self.cleaned_data.get(name) for name in policies.POLICY_FIELDS if name in self.cleaned_data}


class PolicyListView(RoleRequiredMixin, View):
    permission_required = "security.view_rotationpolicy"

    def get(self, request):
        if not RotationPolicy.objects.filter(scope=RotationPolicy.Scope.FLEET).exists():
            policies.rotation_defaults_ensure(actor=request.user)  # first visit of a fresh install
        rows = [(p, policies.schedule_of(p.periodic_task)) for p in policy_list()]
        tick = PeriodicTask.objects.select_related("interval", "crontab").filter(task=policies.TICK_TASK).first()
        return render(
            request,
            "security/rotation_policies.html",
            {
                "rows": rows,
                "tick": tick,
                "tick_schedule": policies.schedule_of(tick),
                "can_add": user_can(request.user, "security.add_rotationpolicy"),
                "can_change": user_can(request.user, "security.change_rotationpolicy"),
                "can_delete": user_can(request.user, "security.delete_rotationpolicy"),
                "can_rotate": user_can(request.user, ROTATE),
                "section": "devices",
            },
        )


class PolicyFormView(RoleRequiredMixin, View):
    """Create (no pk) or edit a policy and its schedule."""

    def get_permission_required(self):
        return "security.change_rotationpolicy" if self.kwargs.get("pk") else "security.add_rotationpolicy"

    def _policy(self):
        pk = self.kwargs.get("pk")
        return get_object_or_404(RotationPolicy, pk=pk) if pk else None

    def render_page(self, form, policy, status=200):
        return render(
            self.request,
            "security/rotation_policy_form.html",
            {"form": form, "policy": policy, "section": "devices"},
            status=status,
        )

    def get(self, request, pk=None):
        policy = self._policy()
        form = PolicyForm(instance=policy, editing=policy is not None)
        return self.render_page(form, policy)

    def post(self, request, pk=None):
        policy = self._policy()
        form = PolicyForm(request.POST, instance=policy or RotationPolicy(), editing=policy is not None)
        if not form.is_valid():
            return self.render_page(form, policy, status=400)
        try:
            schedule = form.schedule()
            if policy is None:
                policy = policies.rotation_policy_create(actor=request.user, data=form.policy_data(), schedule=schedule)
            else:
                policy = policies.rotation_policy_update(
                    actor=request.user, policy=policy, data=form.policy_data(), schedule=schedule
                )
        except ValidationError as exc:
            add_service_errors(form, exc)
            return self.render_page(form, policy if policy and policy.pk else None, status=400)
        messages.success(
            request,
            f"Policy {policy.name!r} saved; its schedule is {policies.schedule_of(policy.periodic_task).label()}.",
        )
        return redirect("rotation-policies")


class PolicyDeleteView(RoleRequiredMixin, View):
    permission_required = "security.delete_rotationpolicy"

    def post(self, request, pk):
        policy = get_object_or_404(RotationPolicy, pk=pk)
        try:
            policies.rotation_policy_delete(actor=request.user, policy=policy)
        except ValidationError as exc:
            messages.error(request, " ".join(exc.messages))
        else:
            messages.success(request, f"Policy {policy.name!r} and its schedule deleted.")
        return redirect("rotation-policies")


class PolicyRunView(RoleRequiredMixin, View):
    """Run a policy now (what its schedule does), as the person who clicked."""

    permission_required = ROTATE

    def post(self, request, pk):
        policy = get_object_or_404(RotationPolicy, pk=pk)
        if not policy.enabled:
            raise Http404("This policy is disabled; enable it first.")
        due = list(policies.rotation_policy_due(policy).values_list("client_id", flat=True)[: policy.batch_size])
        started = rotation.rotation_start_many(
            actor=request.user, client_ids=due, trigger=CredentialRotation.Trigger.MANUAL, policy=policy
        )
        messages.success(request, f"Policy {policy.name!r}: {started} rotation(s) started.")
        return redirect("/rotations/?open=true")
