"""Template tags for broker enforcement cards that other pages include without extra context:
``{% broker_status as broker %}`` (overview card) and ``{% device_security device as sec %}`` (device panel).
Each runs a fixed number of queries, whatever the fleet size."""

from django import template

from security.models import DeviceCredential, EnforcementChange
from security.permissions import user_can

register = template.Library()


@register.simple_tag
def broker_status() -> dict:
    from security.services import enforcement_summary

    return enforcement_summary()


@register.simple_tag(takes_context=True)
def device_security(context, device) -> dict:
    user = context.get("user")
    credential = DeviceCredential.objects.filter(device_id=device.pk).first()
    last_change = EnforcementChange.objects.filter(client_id=device.client_id).order_by("-id").first()
    if last_change is None:
        enforcement = "none"
    elif last_change.state == EnforcementChange.State.APPLIED:
        enforcement = "verified" if (last_change.probe or {}).get("ok") else "applied"
    else:
        enforcement = last_change.state
    on_broker = credential is not None and device.status in ("active", "quarantined")
    return {
        "credential": credential,
        "last_change": last_change,
        "enforcement": enforcement,
        "on_broker": on_broker,
        "can_issue": user_can(user, "devices.issue_credentials") and device.status in ("active", "quarantined"),
        "can_view_policy": user_can(user, "security.view_brokerstate"),
    }
