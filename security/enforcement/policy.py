"""The desired state of every identity, as data no broker shapes: may it connect, with which stored secret, bound to
which client id, which topics it may publish on and which filters it may subscribe with (design.md, "Enforcement
core and broker adapters").

Pure: nothing here reads the database, a file or a broker. ``security.enforcement.state`` builds identities from
the database; the adapters turn them into one broker's enforcement (Mosquitto's password and ACL files, the HTTP
auth hook a clustered broker asks).

The topic rule is the topic scheme's (security/topics.py): a fixed, finite set of channels per device, never
``tx/<id>/#``; a quarantined device keeps exactly the repair path.
"""

from __future__ import annotations

from dataclasses import dataclass

from security import topics

ACTIVE, QUARANTINED = "active", "quarantined"
ENFORCED_STATUSES = (ACTIVE, QUARANTINED)  # revoked and decommissioned devices may not connect at all

DEVICE = "device"
# The console's own identities that every broker knows (the broker-log monitor and the session watcher read
# Mosquitto's $SYS log: they exist on Mosquitto only, see security/brokers/render.py).
CONSUMER, COMMANDER, PROBE = "consumer", "commander", "probe"


@dataclass(frozen=True)
class Grants:
    """``publish``: topic patterns (``+`` matches one level) the identity may publish on. ``subscribe``: the filters
    it may subscribe with; a requested filter is allowed when one of these covers it (``covers``)."""

    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()


NO_GRANTS = Grants()


@dataclass(frozen=True)
class Identity:
    username: str
    kind: str  # DEVICE or a console role
    may_connect: bool
    secret_hash: str = ""  # the stored form (security.enforcement.secrets); "" when it has none
    console_secret: str = ""  # a console identity's secret (from the settings), compared in constant time
    client_id: str = ""  # the only client id this credential may use (the username: one credential, one session)
    status: str = ""  # a device's status
    grants: Grants = NO_GRANTS
    max_packet_bytes: int = 0

    @property
    def is_device(self) -> bool:
        return self.kind == DEVICE


def device_grants(client_id: str, status: str, *, rx_prefix: str, tx_prefix: str) -> dict[str, list[str]]:
    """What one device may do, in words for the policy page: the channels it may publish on and receive."""
    if status not in ENFORCED_STATUSES:
        return {"publish": [], "subscribe": []}
    tx = topics.TX_CHANNELS if status == ACTIVE else topics.REPAIR_TX_CHANNELS
    rx = topics.RX_CHANNELS if status == ACTIVE else topics.REPAIR_RX_CHANNELS
    return {
        "publish": [f"{tx_prefix}/{client_id}/{c}" for c in tx],
        "subscribe": [f"{rx_prefix}/{client_id}/{c}" for c in rx],
    }


def device_identity(
    *, client_id: str, status: str, secret_hash: str, rx_prefix: str, tx_prefix: str, max_packet_bytes: int
) -> Identity:
    """A device may connect when it is active or quarantined and holds a secret. It may subscribe with its receive
    channels, one by one or as ``rx/<id>/+`` or ``rx/<id>/#`` (the device library subscribes with ``#``).

    A quarantined device's subscription to ``rx/<id>/#`` is granted too, so that it still receives the repair
    channels: on a broker that filters each delivery (Mosquitto), the ACL still withholds the other channels; on a
    broker that checks a subscription once (RabbitMQ), only the console's commander may publish on ``rx/...``."""
    grants = device_grants(client_id, status, rx_prefix=rx_prefix, tx_prefix=tx_prefix)
    may_connect = status in ENFORCED_STATUSES and bool(secret_hash)
    subscribe = tuple(grants["subscribe"])
    if may_connect:
        subscribe += (f"{rx_prefix}/{client_id}/+", f"{rx_prefix}/{client_id}/#")
    return Identity(
        username=client_id,
        kind=DEVICE,
        may_connect=may_connect,
        secret_hash=secret_hash,
        client_id=client_id,
        status=status,
        grants=Grants(publish=tuple(grants["publish"]), subscribe=subscribe) if may_connect else NO_GRANTS,
        max_packet_bytes=max_packet_bytes,
    )


def console_identity(
    *, username: str, role: str, secret: str, rx_prefix: str, tx_prefix: str, shared_group: str, max_packet_bytes: int
) -> Identity:
    """The consumer reads every device's transmit channels (directly or through the shared subscription); the
    commander writes every device's receive channels and reads nothing; the canary probe writes its own command
    channel and otherwise acts as a device named like itself."""
    if role == CONSUMER:
        filters = tuple(f"{tx_prefix}/+/{c}" for c in topics.TX_CHANNELS)
        grants = Grants(subscribe=filters + tuple(f"$share/{shared_group}/{f}" for f in filters))
    elif role == COMMANDER:
        grants = Grants(publish=tuple(f"{rx_prefix}/+/{c}" for c in topics.RX_CHANNELS))
    elif role == PROBE:
        device = device_identity(
            client_id=username,
            status=ACTIVE,
            secret_hash="-",
            rx_prefix=rx_prefix,
            tx_prefix=tx_prefix,
            max_packet_bytes=max_packet_bytes,
        ).grants
        grants = Grants(
            publish=device.publish + (f"{rx_prefix}/{username}/{topics.RX_COMMAND}",), subscribe=device.subscribe
        )
    else:
        raise ValueError(f"unknown console role {role!r}")
    return Identity(
        username=username,
        kind=role,
        may_connect=bool(secret),
        console_secret=secret,
        client_id=username,
        grants=grants,
        max_packet_bytes=max_packet_bytes,
    )


# --- matching ---------------------------------------------------------------------------------------------------


def _levels(text: str) -> list[str]:
    return text.split("/")


def is_valid_topic(topic: str) -> bool:
    """A topic a client may publish on: not empty, no wildcard, no NUL."""
    return bool(topic) and not any(ch in topic for ch in "+#\x00")


def is_valid_filter(topic_filter: str) -> bool:
    """MQTT's filter syntax: ``#`` only as the whole last level, ``+`` only as a whole level."""
    if not topic_filter or "\x00" in topic_filter:
        return False
    levels = _levels(topic_filter)
    for n, level in enumerate(levels):
        if "#" in level and (level != "#" or n != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def pattern_matches(pattern: str, topic: str) -> bool:
    """A grant's pattern (``+`` = one level, a trailing ``#`` = the rest) against a concrete topic. A topic that
    starts with ``$`` is matched only by a pattern that names its first level (MQTT 4.7.2)."""
    p, t = _levels(pattern), _levels(topic)
    if t[0].startswith("$") and p[0] != t[0]:
        return False
    for n, level in enumerate(p):
        if level == "#":
            return n == len(p) - 1
        if n >= len(t):
            return False
        if level != "+" and level != t[n]:
            return False
    return len(p) == len(t)


def covers(grant: str, requested: str) -> bool:
    """A granted filter covers a requested filter when everything the request could ever receive, the grant
    allows: a literal level must be the same literal, ``+`` covers any one level (``+`` included), and a trailing
    ``#`` covers the rest (``#`` included). So ``rx/dev-a/#`` covers ``rx/dev-a/+`` but nothing covers a bare
    ``#`` except ``#``."""
    g, r = _levels(grant), _levels(requested)
    if r[0].startswith("$") and g[0] != r[0]:
        return False
    for n, level in enumerate(g):
        if level == "#":
            return n == len(g) - 1
        if n >= len(r):
            return False
        if r[n] == "#":
            return False
        if level != "+" and level != r[n]:
            return False
    return len(g) == len(r)
