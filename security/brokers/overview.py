"""Read side of enforcement for the policy page, GET /api/v1/policy/ and the overview card: what is rendered,
what the broker loads, what is pending. JSON-ready dicts, a fixed number of queries."""

from __future__ import annotations

from django.conf import settings

from security.enforcement.policy import device_grants

from .render import redact_passwd

OUTBOX_RECENT = 25
PASSWD_PREVIEW_LINES = 200


def _iso(value):
    return value.isoformat() if value else None


def broker_state_dict(state) -> dict:
    if state is None:
        return {"reachable": False, "last_checked": None, "never_checked": True}
    return {
        "adapter": state.adapter,
        "reachable": state.reachable,
        "last_checked": _iso(state.last_checked),
        "last_reload": _iso(state.last_reload),
        "pid": state.broker_pid,
        "applied_digest": state.applied_digest,
        "last_probe_at": _iso(state.last_probe_at),
        "last_probe_ok": state.last_probe_ok,
        "last_probe": state.last_probe,
        "last_error": state.last_error,
        "drift": state.drift,
        "drift_found_at": _iso(state.drift_found_at),
    }


def outbox_dict(limit: int = OUTBOX_RECENT) -> list[dict]:
    from security.models import EnforcementChange

    return [
        {
            "id": change.id,
            "kind": change.kind,
            "client_id": change.client_id,
            "summary": change.summary,
            "state": change.state,
            "attempts": change.attempts,
            "last_error": change.last_error,
            "created": _iso(change.created),
            "applied_at": _iso(change.applied_at),
            "probe_ok": (change.probe or {}).get("ok") if change.probe else None,
        }
        for change in EnforcementChange.objects.order_by("-id")[:limit]
    ]


def device_policy(client_id: str, policy) -> dict:
    from devices.models import Device

    device = Device.objects.filter(client_id=client_id).select_related("credential").first()
    if device is None:
        return {"client_id": client_id, "found": False}
    credential = getattr(device, "credential", None)
    on_broker = client_id in set(policy.device_usernames)
    grants = device_grants(
        client_id,
        device.status,
        rx_prefix=settings.MQTT_TOPIC_RX_PREFIX,
        tx_prefix=settings.MQTT_TOPIC_TX_PREFIX,
    )
    if not on_broker:
        grants = {"publish": [], "subscribe": []}
    return {
        "client_id": client_id,
        "found": True,
        "status": device.status,
        "has_credential": credential is not None,
        "credential_issued_at": _iso(credential.issued_at) if credential else None,
        "on_broker": on_broker,
        "publish": grants["publish"],
        "subscribe": grants["subscribe"],
        "never": ["$SYS/#", "$CONTROL/#", "any other device's topics"],
    }


def policy_overview(*, client_id: str = "", include_passwd_preview: bool = False) -> dict:
    from security.services import broker_drift, enforcement_summary, policy_desired

    policy = policy_desired()
    summary = enforcement_summary()
    data = {
        "status": summary["label"],
        "digest": policy.digest,
        "config": policy.config,
        "acl": policy.acl,
        "password_file_usernames": list(policy.console_usernames) + list(policy.device_usernames),
        "device_count": len(policy.device_usernames),
        "quarantined": list(policy.quarantined),
        "device": device_policy(client_id.strip(), policy) if client_id.strip() else None,
        "broker": broker_state_dict(summary["state"]),
        "outbox": {"pending": summary["pending"], "failed": summary["failed"], "recent": outbox_dict()},
        "diff": broker_drift(policy=policy),
    }
    if include_passwd_preview:
        lines = redact_passwd(policy.passwd).splitlines()
        data["passwd_preview"] = "\n".join(lines[:PASSWD_PREVIEW_LINES])
        data["passwd_more"] = max(0, len(lines) - PASSWD_PREVIEW_LINES)
    return data
