"""The desired state read from the database and the settings: the ``Identity`` of one username (what the HTTP
auth hook asks about, one indexed query) and the console's own identities."""

from __future__ import annotations

from django.conf import settings

from devices.models import Device
from devices.validators import is_valid_client_id

from .policy import COMMANDER, CONSUMER, ENFORCED_STATUSES, PROBE, Identity, console_identity, device_identity


def consumer_usernames() -> list[str]:
    """One username per consumer replica: a username is one session (the credential is bound to its client id)."""
    base = settings.MQTT_CONSUMER_USERNAME
    return [base] + [f"{base}-{n}" for n in range(2, settings.MQTT_CONSUMER_REPLICAS + 1)]


def _topic_settings() -> dict:
    return {
        "rx_prefix": settings.MQTT_TOPIC_RX_PREFIX,
        "tx_prefix": settings.MQTT_TOPIC_TX_PREFIX,
        "max_packet_bytes": settings.MQTT_MAX_PACKET_SIZE,
    }


def console_identities_desired() -> list[Identity]:
    """The console identities every broker knows: consumer replicas, commander, canary probe."""
    roles = [(name, CONSUMER, settings.MQTT_CONSUMER_PASSWORD) for name in consumer_usernames()]
    roles.append((settings.MQTT_COMMANDER_USERNAME, COMMANDER, settings.MQTT_COMMANDER_PASSWORD))
    roles.append((settings.MQTT_PROBE_USERNAME, PROBE, settings.MQTT_PROBE_PASSWORD))
    return [
        console_identity(
            username=name,
            role=role,
            secret=secret,
            shared_group=settings.MQTT_SHARED_SUBSCRIPTION_GROUP,
            **_topic_settings(),
        )
        for name, role, secret in roles
    ]


def identity_desired(username: str) -> Identity | None:
    """The identity named ``username``, or None when no device or console identity has that name. A device name
    outside the fleet's prefix rule is never looked up."""
    for identity in console_identities_desired():
        if identity.username == username:
            return identity
    if not is_valid_client_id(username):
        return None
    row = (
        Device.objects.filter(client_id=username).order_by().values_list("status", "credential__password_hash").first()
    )
    if row is None:
        return None
    status, secret_hash = row
    return device_identity(
        client_id=username,
        status=status,
        secret_hash=(secret_hash or "") if status in ENFORCED_STATUSES else "",
        **_topic_settings(),
    )
