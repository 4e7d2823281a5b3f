"""Pages for broker enforcement: issue a device secret (shown once), the policy page, "Sync now"."""

from django.conf import settings
from django.contrib import messages
from django.core.exceptions import ValidationError
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views import View

from devices.models import Device
from security import services
from security.brokers.overview import policy_overview
from security.permissions import RoleRequiredMixin, user_can


def _device_url(client_id: str) -> str:
    try:
        return reverse("device-detail", args=[client_id])
    except Exception:  # the device pages belong to the UI work; fall back to the policy page
        return reverse("broker-policy") + f"?client_id={client_id}"


class CredentialIssueView(RoleRequiredMixin, View):
    """POST only. The answer is the one page that ever shows the secret: not cached, not in the session, not in a
    redirect; reloading it does not show the secret again (a GET goes back to the device)."""

    permission_required = "devices.issue_credentials"
    http_method_names = ["get", "post"]

    def get(self, request, client_id: str):
        return redirect(_device_url(client_id))

    def post(self, request, client_id: str):
        device = get_object_or_404(Device, client_id=client_id)
        secret = request.POST.get("password", "").strip() or None
        try:
            issued = services.credential_issue(actor=request.user, device=device, secret=secret)
        except ValidationError as exc:
            for message in exc.messages:
                messages.error(request, message)
            return redirect(_device_url(client_id))
        response = render(
            request,
            "security/credential_issued.html",
            {
                "device": issued.device,
                "issued": issued,
                "host": settings.MQTT_PUBLIC_HOST,
                "port": settings.MQTT_PORT,
                "tls_port": settings.MQTT_TLS_PORT,
                "rx_filter": f"{settings.MQTT_TOPIC_RX_PREFIX}/{issued.client_id}/#",
                "tx_telemetry": f"{settings.MQTT_TOPIC_TX_PREFIX}/{issued.client_id}/telemetry",
                "device_url": _device_url(issued.client_id),
            },
        )
        response["Cache-Control"] = "no-store"
        response["Pragma"] = "no-cache"
        return response


class PolicyView(RoleRequiredMixin, View):
    permission_required = "security.view_brokerstate"

    def get(self, request):
        client_id = request.GET.get("client_id", "").strip()[:128]
        data = policy_overview(client_id=client_id, include_passwd_preview=True)
        return render(
            request,
            "security/policy.html",
            {
                "policy": data,
                "client_id": client_id,
                "can_sync": user_can(request.user, "security.sync_policy"),
                "section": "policy",
            },
        )


class PolicySyncView(RoleRequiredMixin, View):
    permission_required = "security.sync_policy"
    http_method_names = ["post"]

    def post(self, request):
        services.reconcile_enqueue(actor=request.user, trigger="ui")
        messages.success(request, "A reconcile has been queued; this page shows its result once a worker has run it.")
        return redirect("broker-policy")
