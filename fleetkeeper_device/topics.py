"""The topic scheme, device side. The one place that spells the channel names.

A device publishes on ``<tx>/<client_id>/<channel>`` for the channels in ``DEVICE_PUBLISH_CHANNELS`` and
receives on ``<rx>/<client_id>/<channel>`` for ``DEVICE_RECEIVE_CHANNELS``. The sets are fixed and
finite on purpose: the broker's ACL grants exactly these topics (never ``tx/<id>/#``), which is what
lets the console quarantine a device by denying precisely the channels it loses.

The prefixes are configurable (the console reads ``MQTT_TOPIC_TX_PREFIX`` / ``MQTT_TOPIC_RX_PREFIX``);
the channel names are not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

DEFAULT_TX_PREFIX = "tx"
DEFAULT_RX_PREFIX = "rx"

# Device -> console
TELEMETRY = "telemetry"
STATUS = "status"
ACK = "ack"
CSR = "csr"
DEVICE_PUBLISH_CHANNELS: tuple[str, ...] = (TELEMETRY, STATUS, ACK, CSR)

# Console -> device
COMMAND = "command"
CONFIG = "config"
CREDENTIALS = "credentials"
FIRMWARE = "firmware"
DEVICE_RECEIVE_CHANNELS: tuple[str, ...] = (COMMAND, CONFIG, CREDENTIALS, FIRMWARE)

# Characters that change what a topic means; never allowed in a client id or a prefix.
FORBIDDEN_TOPIC_CHARACTERS = frozenset("#+/$ \t\r\n\x00")


class TopicError(ValueError):
    """A client id or prefix that would produce an ambiguous or wildcard topic."""


class ParsedTopic(NamedTuple):
    direction: str  # "tx" (device -> console) or "rx" (console -> device), whatever the prefixes are
    client_id: str
    channel: str


def _check_segment(kind: str, value: str) -> str:
    if not value:
        raise TopicError(f"{kind} must not be empty")
    bad = sorted(set(value) & FORBIDDEN_TOPIC_CHARACTERS)
    if bad:
        raise TopicError(f"{kind} {value!r} contains {''.join(bad)!r}, which MQTT treats as topic syntax")
    return value


@dataclass(frozen=True)
class TopicScheme:
    """Builds and parses the topics of one fleet. Immutable; cheap to share between thousands of devices."""

    tx_prefix: str = DEFAULT_TX_PREFIX
    rx_prefix: str = DEFAULT_RX_PREFIX

    def __post_init__(self) -> None:
        _check_segment("tx prefix", self.tx_prefix)
        _check_segment("rx prefix", self.rx_prefix)
        if self.tx_prefix == self.rx_prefix:
            raise TopicError("tx and rx prefixes must differ, or a device could read what it publishes")

    # Device -> console
    def tx(self, client_id: str, channel: str) -> str:
        if channel not in DEVICE_PUBLISH_CHANNELS:
            raise TopicError(f"{channel!r} is not a device publish channel; use one of {DEVICE_PUBLISH_CHANNELS}")
        return f"{self.tx_prefix}/{_check_segment('client id', client_id)}/{channel}"

    def telemetry(self, client_id: str) -> str:
        return self.tx(client_id, TELEMETRY)

    def status(self, client_id: str) -> str:
        return self.tx(client_id, STATUS)

    def ack(self, client_id: str) -> str:
        return self.tx(client_id, ACK)

    def csr(self, client_id: str) -> str:
        return self.tx(client_id, CSR)

    # Console -> device
    def rx(self, client_id: str, channel: str) -> str:
        if channel not in DEVICE_RECEIVE_CHANNELS:
            raise TopicError(f"{channel!r} is not a device receive channel; use one of {DEVICE_RECEIVE_CHANNELS}")
        return f"{self.rx_prefix}/{_check_segment('client id', client_id)}/{channel}"

    def rx_filter(self, client_id: str) -> str:
        """The one subscription a device makes: everything addressed to it, nothing else."""
        return f"{self.rx_prefix}/{_check_segment('client id', client_id)}/#"

    def tx_filter(self, channel: str) -> str:
        """What a console-side consumer subscribes to, e.g. ``tx/+/telemetry``."""
        if channel not in DEVICE_PUBLISH_CHANNELS:
            raise TopicError(f"{channel!r} is not a device publish channel")
        return f"{self.tx_prefix}/+/{channel}"

    def parse(self, topic: str) -> ParsedTopic | None:
        """Split a device topic; None for anything that is not exactly ``<prefix>/<id>/<known channel>``."""
        parts = topic.split("/")
        if len(parts) != 3 or not parts[1]:
            return None
        prefix, client_id, channel = parts
        if prefix == self.tx_prefix and channel in DEVICE_PUBLISH_CHANNELS:
            return ParsedTopic("tx", client_id, channel)
        if prefix == self.rx_prefix and channel in DEVICE_RECEIVE_CHANNELS:
            return ParsedTopic("rx", client_id, channel)
        return None


DEFAULT_SCHEME = TopicScheme()
