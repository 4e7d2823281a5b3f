"""The topic scheme in one place (design.md, "Topic scheme"). Every module that builds or matches a device
topic imports from here; the prefixes come from settings (MQTT_TOPIC_RX_PREFIX / MQTT_TOPIC_TX_PREFIX).

The channels are a fixed, finite set: the broker ACL grants exactly these, never ``tx/<id>/#``, because a
quarantine is expressed as deny lines for exactly the channels a device loses (mosquitto-notes.md,
"Precedence": a matching deny wins over every allow).
"""

from __future__ import annotations

from django.conf import settings

from fleetkeeper_device import topics as device_topics

# What a device publishes (tx) and receives (rx): the channel names are the device library's, so the
# console and the firmware cannot disagree about them; the prefixes are the console's settings.
TX_TELEMETRY, TX_STATUS, TX_ACK, TX_CSR = (
    device_topics.TELEMETRY,
    device_topics.STATUS,
    device_topics.ACK,
    device_topics.CSR,
)
RX_COMMAND, RX_CONFIG, RX_CREDENTIALS, RX_FIRMWARE = (
    device_topics.COMMAND,
    device_topics.CONFIG,
    device_topics.CREDENTIALS,
    device_topics.FIRMWARE,
)
TX_CHANNELS: tuple[str, ...] = device_topics.DEVICE_PUBLISH_CHANNELS
RX_CHANNELS: tuple[str, ...] = device_topics.DEVICE_RECEIVE_CHANNELS

# What a quarantined device keeps: the repair path (new credentials, new firmware, and its acknowledgements).
REPAIR_RX_CHANNELS: tuple[str, ...] = (RX_CREDENTIALS, RX_FIRMWARE)
REPAIR_TX_CHANNELS: tuple[str, ...] = (TX_ACK,)
QUARANTINE_DENIED_RX: tuple[str, ...] = tuple(c for c in RX_CHANNELS if c not in REPAIR_RX_CHANNELS)
QUARANTINE_DENIED_TX: tuple[str, ...] = tuple(c for c in TX_CHANNELS if c not in REPAIR_TX_CHANNELS)


def rx_prefix() -> str:
    return settings.MQTT_TOPIC_RX_PREFIX


def tx_prefix() -> str:
    return settings.MQTT_TOPIC_TX_PREFIX


def rx_topic(client_id: str, channel: str) -> str:
    """Console -> device."""
    if channel not in RX_CHANNELS:
        raise ValueError(f"unknown rx channel {channel!r}")
    return f"{rx_prefix()}/{client_id}/{channel}"


def tx_topic(client_id: str, channel: str) -> str:
    """Device -> console."""
    if channel not in TX_CHANNELS:
        raise ValueError(f"unknown tx channel {channel!r}")
    return f"{tx_prefix()}/{client_id}/{channel}"


def device_rx_filter(client_id: str) -> str:
    """What a device subscribes to: it receives exactly the rx channels through it."""
    return f"{rx_prefix()}/{client_id}/#"


def fleet_tx_filter(channel: str, *, shared_group: str | None = None) -> str:
    """What the console's consumer subscribes to, e.g. ``$share/fleetkeeper/tx/+/telemetry``."""
    if channel not in TX_CHANNELS:
        raise ValueError(f"unknown tx channel {channel!r}")
    topic = f"{tx_prefix()}/+/{channel}"
    return f"$share/{shared_group}/{topic}" if shared_group else topic


def rx_client_id(topic: str) -> str | None:
    """The device a ``rx/<client_id>/<channel>`` topic is for, or None for any other topic."""
    parts = topic.split("/")
    if len(parts) != 3 or parts[0] != rx_prefix() or not parts[1]:
        return None
    return parts[1]


def parse_tx_topic(topic: str) -> tuple[str, str] | None:
    """``tx/<client_id>/<channel>`` -> (client_id, channel), or None for anything else."""
    parts = topic.split("/")
    if len(parts) != 3 or parts[0] != tx_prefix() or parts[2] not in TX_CHANNELS or not parts[1]:
        return None
    return parts[1], parts[2]
