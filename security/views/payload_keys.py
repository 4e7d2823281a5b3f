"""Pages for payload encryption: the device page's "Payload encryption" card (htmx fragment), issuing a payload key
(the one page that ever shows it), and the device's "encryption required" setting."""

import redis
from django.conf import settings
from django.contrib import messages
from django.core.exceptions import ValidationError
from django.shortcuts import get_object_or_404, redirect, render
from django.views import View

from devices.models import Device
from fleetkeeper_device import sealing
from security import payloads
from security.detection.payloads import device_totals
from security.permissions import RoleRequiredMixin, user_can

REQUIRED_CHOICES = {"": None, "yes": True, "no": False}


def _totals(client_id: str) -> dict | None:
    """What the consumers counted for the device (Redis); None when Redis cannot be reached (the card says so)."""
    try:
        return device_totals(redis.Redis.from_url(settings.REDIS_URL, socket_timeout=0.5), client_id)
    except redis.RedisError:
        return None


class DevicePayloadKeyFragmentView(RoleRequiredMixin, View):
    permission_required = "devices.view_device"

    def get(self, request, client_id):
        device = get_object_or_404(Device, client_id=client_id)
        row = payloads.payload_key_for(device)
        return render(
            request,
            "security/_device_payload_key.html",
            {
                "device": device,
                "key": row,
                "required_effective": payloads.required_effective(row) if row else False,
                "fleet_required": settings.PAYLOAD_ENCRYPTION_REQUIRED,
                "totals": _totals(device.client_id),
                "can_issue": user_can(request.user, payloads.PERMISSION),
            },
        )


class PayloadKeyIssueView(RoleRequiredMixin, View):
    """POST only. The answer is the one page that ever shows the key: not cached, not in the session, not in a
    redirect; reloading it does not show the key again (a GET goes back to the device)."""

    permission_required = payloads.PERMISSION

    def get(self, request, client_id):
        return redirect("device-detail", client_id=client_id)

    def post(self, request, client_id):
        device = get_object_or_404(Device, client_id=client_id)
        try:
            issued = payloads.payload_key_issue(
                actor=request.user, device=device, required=REQUIRED_CHOICES.get(request.POST.get("required", ""))
            )
        except ValidationError as exc:
            for message in exc.messages:
                messages.error(request, message)
            return redirect("device-detail", client_id=client_id)
        response = render(
            request,
            "security/payload_key_issued.html",
            {
                "device": device,
                "issued": issued,
                "overhead": sealing.OVERHEAD,
                "telemetry_topic": f"{settings.MQTT_TOPIC_TX_PREFIX}/{device.client_id}/telemetry",
            },
        )
        response["Cache-Control"] = "no-store"
        response["Pragma"] = "no-cache"
        return response


class PayloadKeyRequireView(RoleRequiredMixin, View):
    permission_required = payloads.PERMISSION

    def post(self, request, client_id):
        device = get_object_or_404(Device, client_id=client_id)
        choice = request.POST.get("required", "")
        if choice not in REQUIRED_CHOICES:
            messages.error(request, "Choose yes, no, or the fleet setting.")
            return redirect("device-detail", client_id=client_id)
        try:
            row = payloads.payload_key_set_required(
                actor=request.user, device=device, required=REQUIRED_CHOICES[choice]
            )
        except ValidationError as exc:
            for message in exc.messages:
                messages.error(request, message)
        else:
            state = "required" if payloads.required_effective(row) else "not required"
            messages.success(
                request,
                f"{client_id}: sealed payloads are now {state}. The consumers pick this up within "
                f"{settings.PAYLOAD_KEYS_REFRESH_SECONDS:g} s.",
            )
        return redirect("device-detail", client_id=client_id)
