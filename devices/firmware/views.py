"""Firmware registry pages: releases per model (flags, devices per version, upload, the public key), one release
(offers, withdraw, mark vulnerable, offer to devices with a typed count for large sets), the device page's fragment,
and the image download devices use."""

from __future__ import annotations

import re

from django import forms
from django.conf import settings
from django.contrib import messages
from django.core.exceptions import ValidationError
from django.http import FileResponse, Http404
from django.shortcuts import get_object_or_404, redirect, render
from django.views import View

from devices.models import Device, DeviceModel, FirmwareRelease, FirmwareSigningKey
from fleet.forms import add_service_errors
from security.permissions import RoleRequiredMixin, user_can

from . import selectors, services, versions

VIEW = "devices.view_firmwarerelease"


class UploadForm(forms.Form):
    model = forms.ModelChoiceField(queryset=DeviceModel.objects.all(), to_field_name="name", empty_label=None)
    version = forms.CharField(max_length=64, help_text=versions.FORMAT_HELP)
    image = forms.FileField(required=False, help_text="The console stores it and computes its size and SHA-256.")
    url = forms.URLField(
        required=False,
        max_length=2048,
        label="Or: URL of an image hosted elsewhere",
        assume_scheme="https",
        widget=forms.TextInput(attrs={"inputmode": "url", "placeholder": "https://"}),
    )
    sha256 = forms.CharField(required=False, max_length=64, label="SHA-256 (with a URL)")
    size = forms.IntegerField(required=False, min_value=1, label="Size in bytes (with a URL)")
    notes = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 3}))
    minimum_secure = forms.BooleanField(
        required=False, label="Minimum secure version: devices below it get a critical alert"
    )


class ReasonForm(forms.Form):
    text = forms.CharField(widget=forms.Textarea(attrs={"rows": 3}), max_length=5000)


class OfferForm(forms.Form):
    confirm_count = forms.CharField(required=False, label="Number of devices")


def _error_text(exc: ValidationError) -> str:
    return " ".join(exc.messages)


class FirmwareListView(RoleRequiredMixin, View):
    permission_required = VIEW

    def get(self, request, form=None, status=200):
        filterset = selectors.release_list(filters=request.GET)
        filterset.form.auto_id = "filter_%s"  # the upload form on the same page has fields of the same names
        releases = list(filterset.qs)
        labels: dict = {}
        counts = selectors.devices_per_version(model_ids={r.model_id for r in releases}, labels=labels)
        offers = selectors.offer_counts(release_ids=[r.pk for r in releases])
        by_model: dict[str, list] = {}
        known = set()
        for release in releases:
            release.device_count = counts.get((release.model_id, release.version_sort), 0)
            release.offer_states = offers.get(release.pk, {})
            by_model.setdefault(release.model.name, []).append(release)
            known.add((release.model_id, release.version_sort))
        # Versions devices report that the registry does not have (built elsewhere, or older than the registry).
        unregistered: dict[str, list] = {}
        names = {r.model_id: r.model.name for r in releases}
        for (model_id, key), n in sorted(counts.items(), key=lambda item: item[0][1], reverse=True):
            if (model_id, key) not in known and not filterset.form.data.get("version"):
                unregistered.setdefault(names[model_id], []).append((labels[(model_id, key)], n))
        can_upload = user_can(request.user, "devices.add_firmwarerelease")
        return render(
            request,
            "devices/firmware_list.html",
            {
                "section": "firmware",
                "by_model": by_model,
                "unregistered": unregistered,
                "filterset": filterset,
                "filtered": any(v for k, v in request.GET.items() if k != "page"),
                "key": FirmwareSigningKey.objects.filter(active=True).first(),
                "form": form or (UploadForm() if can_upload else None),
                "can_upload": can_upload,
                "can_rotate_key": user_can(request.user, "devices.add_firmwaresigningkey"),
                "has_models": DeviceModel.objects.exists(),
                "format_help": versions.FORMAT_HELP,
            },
            status=status,
        )

    def post(self, request):
        if not user_can(request.user, "devices.add_firmwarerelease"):
            from django.core.exceptions import PermissionDenied

            raise PermissionDenied("Your role does not allow this (devices.add_firmwarerelease).")
        form = UploadForm(request.POST, request.FILES)
        if form.is_valid():
            data = form.cleaned_data
            try:
                release = services.firmware_release_create(
                    actor=request.user,
                    model=data["model"],
                    version=data["version"],
                    image=data["image"].file if data["image"] else None,
                    url=data["url"],
                    sha256=data["sha256"],
                    size=data["size"],
                    notes=data["notes"],
                    minimum_secure=data["minimum_secure"],
                )
            except ValidationError as exc:
                add_service_errors(form, exc)
            else:
                messages.success(request, f"{release} registered and signed with key {release.key.key_id}.")
                return redirect("firmware-detail", pk=release.pk)
        return self.get(request, form=form, status=400)


class FirmwareDetailView(RoleRequiredMixin, View):
    permission_required = VIEW

    def get(self, request, pk: int, offer_form=None, reason_form=None, act_error="", status=200):
        release = get_object_or_404(selectors.release_queryset(), pk=pk)
        counts = selectors.devices_per_version(model_ids=[release.model_id])
        running = counts.get((release.model_id, release.version_sort), 0)
        filters, filter_error = _offer_filters(request.GET)
        preview = None
        if (
            not filter_error
            and user_can(request.user, "devices.offer_firmware")
            and not services.offer_refusal(release)
        ):
            targets = selectors.offer_targets(release=release, filters=filters)
            preview = {
                "eligible": targets.count(),
                "sample": list(targets.order_by("client_id").values_list("client_id", flat=True)[:5]),
                "needs_count": False,
            }
            preview["needs_count"] = preview["eligible"] > settings.FIRMWARE_OFFER_CONFIRM_ABOVE
        return render(
            request,
            "devices/firmware_detail.html",
            {
                "section": "firmware",
                "release": release,
                "running": running,
                "offer_states": selectors.offer_counts(release_ids=[release.pk]).get(release.pk, {}),
                "offers": list(selectors.offer_list(release=release)[:50]),
                "refusal": services.offer_refusal(release),
                "filters": filters,
                "filter_error": filter_error,
                "preview": preview,
                "form": offer_form or OfferForm(),
                "reason_form": reason_form or ReasonForm(),
                "act_error": act_error,
                "confirm_above": settings.FIRMWARE_OFFER_CONFIRM_ABOVE,
                "can_offer": user_can(request.user, "devices.offer_firmware"),
                "can_withdraw": user_can(request.user, "devices.withdraw_firmware"),
                "can_flag": user_can(request.user, "devices.flag_firmware"),
                "groups": release.model.devices.values_list("groups__name", flat=True).distinct().order_by(),
            },
            status=status,
        )


OFFER_FILTERS = ("search", "status", "group", "firmware", "seen")


def _offer_filters(source) -> tuple[dict, str]:
    from security.revocation import bulk_filters_clean

    params = {k: source.getlist(k) if k == "status" else source.get(k) for k in OFFER_FILTERS if source.get(k)}
    try:
        return bulk_filters_clean(params), ""
    except ValidationError as exc:
        return {}, _error_text(exc)


class FirmwareOfferView(RoleRequiredMixin, View):
    """POST with the filters (and the typed count above FIRMWARE_OFFER_CONFIRM_ABOVE devices): offer the release."""

    permission_required = "devices.offer_firmware"

    def post(self, request, pk: int):
        release = get_object_or_404(selectors.release_queryset(), pk=pk)
        if request.POST.get("client_id"):  # one device, from its page
            return self.offer_one(request, release, request.POST["client_id"])
        filters, error = _offer_filters(request.POST)
        detail = FirmwareDetailView()
        detail.request = request
        form = OfferForm(request.POST)
        if error or not form.is_valid():
            return detail.get(request, pk, offer_form=form, act_error=error, status=400)
        ids = list(selectors.offer_targets(release=release, filters=filters).values_list("id", flat=True))
        if len(ids) > settings.FIRMWARE_OFFER_CONFIRM_ABOVE:
            typed = form.cleaned_data["confirm_count"].strip().replace(",", "")
            if typed != str(len(ids)):
                form.add_error(
                    "confirm_count",
                    f"The filters now match {len(ids)} device(s), not {typed or 'nothing'}: check and type the number.",
                )
                return detail.get(request, pk, offer_form=form, status=400)
        try:
            result = services.firmware_offer(actor=request.user, release=release, device_ids=ids)
        except ValidationError as exc:
            return detail.get(request, pk, offer_form=form, act_error=_error_text(exc), status=400)
        skipped = ", ".join(f"{n} {reason}" for reason, n in result["skipped"].items())
        messages.success(
            request,
            f"Offered {release} to {len(result['offered'])} device(s){f' (skipped: {skipped})' if skipped else ''}; "
            "their answers appear below.",
        )
        return redirect("firmware-detail", pk=release.pk)

    def offer_one(self, request, release, client_id: str):
        device = get_object_or_404(Device, client_id=client_id)
        try:
            result = services.firmware_offer(actor=request.user, release=release, devices=[device])
        except ValidationError as exc:
            messages.error(request, _error_text(exc))
        else:
            if result["offered"]:
                messages.success(request, f"Offered {release} to {client_id}; its answer appears on this page.")
            else:
                reasons = ", ".join(result["skipped"])
                messages.error(request, f"{client_id} was not offered {release}: {reasons}.")
        return redirect("device-detail", client_id=client_id)


class FirmwareActView(RoleRequiredMixin, View):
    """Withdraw, or mark known-vulnerable: one reason text, one service."""

    action = ""
    ACTIONS = {
        "withdraw": ("devices.withdraw_firmware", services.firmware_release_withdraw, "reason", "withdrawn"),
        "vulnerable": (
            "devices.flag_firmware",
            services.firmware_release_mark_vulnerable,
            "advisory",
            "marked vulnerable",
        ),
    }

    def get_permission_required(self):
        return self.ACTIONS[self.action][0]

    def post(self, request, pk: int):
        release = get_object_or_404(FirmwareRelease, pk=pk)
        _perm, service, argument, done = self.ACTIONS[self.action]
        form = ReasonForm(request.POST)
        detail = FirmwareDetailView()
        detail.request = request
        if not form.is_valid():
            return detail.get(
                request, pk, reason_form=form, act_error="Give the text (why, or the advisory).", status=400
            )
        try:
            service(actor=request.user, release=release, **{argument: form.cleaned_data["text"]})
        except ValidationError as exc:
            return detail.get(request, pk, reason_form=form, act_error=_error_text(exc), status=400)
        messages.success(request, f"{release} {done}. Devices running it are being alerted.")
        return redirect("firmware-detail", pk=pk)


class SigningKeyCreateView(RoleRequiredMixin, View):
    """Admin only: a new active key; the old one is retired (docs/firmware.md, "Rotating the key")."""

    permission_required = "devices.add_firmwaresigningkey"

    def post(self, request):
        if request.POST.get("confirm") != "rotate":
            messages.error(
                request, "Tick the box to confirm: devices refuse offers signed with a key they do not know."
            )
            return redirect("firmware-list")
        key = services.firmware_signing_key_create(actor=request.user)
        messages.success(request, f"New signing key {key.key_id} is active; the previous key is retired.")
        return redirect("firmware-list")


class FirmwareImageView(View):
    """The image, for devices (no console login: it is public, its integrity comes from the signature). Addressed by
    its SHA-256, the name it is stored under."""

    def get(self, request, sha256: str):
        if (
            not re.fullmatch(r"[0-9a-f]{64}", sha256)
            or not FirmwareRelease.objects.filter(sha256=sha256, withdrawn=False).exclude(stored_name="").exists()
        ):
            raise Http404("No such firmware image.")
        path = settings.FIRMWARE_STORAGE_DIR / f"{sha256}.bin"
        if not path.exists():
            raise Http404("The image file is missing from FIRMWARE_STORAGE_DIR.")
        return FileResponse(path.open("rb"), content_type="application/octet-stream", filename=f"{sha256}.bin")


class DeviceFirmwareView(RoleRequiredMixin, View):
    """The device page's firmware card: running vs latest, the verdict, the last offers."""

    permission_required = VIEW

    def get(self, request, client_id: str):
        from .detection import verdict

        device = get_object_or_404(Device.objects.select_related("model"), client_id=client_id)
        kind = verdict(device.model, device.firmware_version)[0] if device.model else ""
        latest = None
        if device.model_id:
            latest = selectors.release_queryset().filter(model_id=device.model_id, withdrawn=False).first()
        offer_latest = (
            latest is not None
            and not latest.vulnerable
            and device.firmware_version != latest.version
            and device.status in services.OFFERABLE_STATUSES
            and user_can(request.user, "devices.offer_firmware")
        )
        return render(
            request,
            "devices/_device_firmware.html",
            {
                "device": device,
                "verdict": kind,
                "offers": list(selectors.offer_list(client_id=client_id)[:5]),
                "latest_release": latest,
                "offer_latest": offer_latest,
            },
        )
