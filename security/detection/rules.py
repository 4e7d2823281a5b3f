"""Pure detection rules: parse what the broker logs, decide what is suspicious. No database, no Redis, no MQTT, so
each rule has a unit test; the consumer (consumer.py) feeds them and raises the alerts they return.

Mosquitto 2.0.11 logs (mosquitto-notes.md, "What the broker tells you"): connections with their parameters,
refusals without the username, every subscription with client id and filter, takeovers and oversize packets. It
does NOT log denied publishes (debug level is never published), so a cross-device publish is invisible here.
"""

from __future__ import annotations

import ipaddress
import re
from collections import deque
from dataclasses import dataclass, field

# "1763788800: New connection from ..." (log_timestamp true) or the bare message.
_TIMESTAMP_RE = re.compile(r"^\d+: ")
_NEW_CONNECTION_RE = re.compile(r"^New connection from (?P<address>\S+) on port (?P<listener>\d+)\.$")
_CONNECTED_RE = re.compile(r"^New client connected from (?P<address>\S+) as (?P<client_id>\S+) \((?P<flags>[^)]*)\)\.$")
_NOT_AUTHORISED_RE = re.compile(r"^Client (?P<client_id>\S+) disconnected, not authorised\.$")
_TAKEOVER_RE = re.compile(r"^Client (?P<client_id>\S+) already connected, closing old connection\.$")
_OVERSIZE_RE = re.compile(r"^Client (?P<client_id>\S+) disconnected due to oversize packet\.$")
_GONE_RE = re.compile(
    r"^Client (?P<client_id>\S+) (?:disconnected\.|closed its connection\.|has exceeded timeout, disconnecting\.)$"
)
_FLAG_RE = re.compile(r"(?P<key>[pck])(?P<value>\d+)")
# Debug level only (never on the log topic): read from the broker's debug log file when DETECTION_DENIED_PUBLISHES.
_DENIED_PUBLISH_RE = re.compile(
    r"^Denied PUBLISH from (?P<client_id>\S+) \(d\d, q(?P<qos>\d), r\d, m\d+, '(?P<topic>.*)', \.\.\. "
    r"\((?P<size>\d+) bytes\)\)$"
)


@dataclass(frozen=True)
class LogEvent:
    kind: str  # new_connection | connected | not_authorised | takeover | oversize | gone | subscribe | denied_publish
    client_id: str = ""
    address: str = ""  # source IP (no port)
    port: int = 0
    protocol: int = 0
    clean: int = -1
    keepalive: int = -1
    topic_filter: str = ""  # subscribe: the filter; denied_publish: the topic
    line: str = ""
    qos: int = 0
    size: int = 0


def split_address(value: str) -> tuple[str, int]:
    """``127.0.0.1:40116`` or ``::1:40116`` -> (address, port)."""
    host, _, port = value.rpartition(":")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        return value, 0


def parse_log_line(text: str, *, subscribe: bool = False) -> LogEvent | None:
    """One line from ``$SYS/broker/log/...``; None for lines no rule uses."""
    line = _TIMESTAMP_RE.sub("", text.strip(), count=1)
    if subscribe:  # $SYS/broker/log/M/subscribe: "<client id> <qos> <filter>"
        parts = line.split(" ", 2)
        if len(parts) != 3 or not parts[1].isdigit():
            return None
        return LogEvent("subscribe", client_id=parts[0], topic_filter=parts[2], line=line)
    if match := _NEW_CONNECTION_RE.match(line):
        address, port = split_address(match["address"])
        return LogEvent("new_connection", address=address, port=port, line=line)
    if match := _CONNECTED_RE.match(line):
        address, port = split_address(match["address"])
        flags = {m["key"]: int(m["value"]) for m in _FLAG_RE.finditer(match["flags"].split("u'", 1)[0])}
        return LogEvent(
            "connected",
            client_id=match["client_id"],
            address=address,
            port=port,
            protocol=flags.get("p", 0),
            clean=flags.get("c", -1),
            keepalive=flags.get("k", -1),
            line=line,
        )
    if match := _NOT_AUTHORISED_RE.match(line):
        return LogEvent("not_authorised", client_id=match["client_id"], line=line)
    if match := _TAKEOVER_RE.match(line):
        return LogEvent("takeover", client_id=match["client_id"], line=line)
    if match := _OVERSIZE_RE.match(line):
        return LogEvent("oversize", client_id=match["client_id"], line=line)
    if match := _GONE_RE.match(line):
        return LogEvent("gone", client_id=match["client_id"], line=line)
    if match := _DENIED_PUBLISH_RE.match(line):
        return LogEvent(
            "denied_publish",
            client_id=match["client_id"],
            topic_filter=match["topic"],
            qos=int(match["qos"]),
            size=int(match["size"]),
            line=line,
        )
    return None


# --- authentication failures -------------------------------------------------------------------------------


@dataclass
class Finding:
    """What a rule found; the consumer turns it into ``alert_raise``."""

    kind: str
    subject: str
    summary: str
    client_id: str = ""
    evidence: dict = field(default_factory=dict)
    severity: str | None = None


class ConnectionAttribution:
    """A refusal names no user and no address: attribute it to the newest ``New connection`` line that has not
    been matched by a successful connect yet (the broker handles a CONNECT right after accepting the socket)."""

    def __init__(self, max_pending: int = 10_000, ttl: float = 30.0):
        self.pending: dict[tuple[str, int], float] = {}
        self.max_pending = max_pending
        self.ttl = ttl

    def opened(self, address: str, port: int, now: float) -> None:
        self.pending.pop((address, port), None)
        self.pending[(address, port)] = now
        if len(self.pending) > self.max_pending:
            self.pending.pop(next(iter(self.pending)))

    def connected(self, address: str, port: int) -> None:
        self.pending.pop((address, port), None)

    def refused(self, now: float) -> str:
        """The source address of the refused connection, or "" if nothing fits."""
        while self.pending:
            key, opened_at = next(reversed(self.pending.items()))
            del self.pending[key]
            if now - opened_at <= self.ttl:
                return key[0]
        return ""


class AuthFailureRule:
    """Failures per source address in a sliding window. ``threshold`` from one address is brute force;
    failures from ``spray_addresses`` different addresses in the window is spraying (the broker does not log the
    username, so spraying is seen as many sources failing, not as many usernames)."""

    def __init__(self, *, window: float, threshold: int, spray_addresses: int):
        self.window, self.threshold, self.spray_addresses = window, threshold, spray_addresses
        self.failures: dict[str, deque[float]] = {}
        self.recent: deque[tuple[float, str]] = deque()

    def _trim(self, now: float) -> None:
        cutoff = now - self.window
        while self.recent and self.recent[0][0] < cutoff:
            _, address = self.recent.popleft()
            times = self.failures.get(address)
            while times and times[0] < cutoff:
                times.popleft()
            if times is not None and not times:
                del self.failures[address]

    def failure(self, address: str, now: float) -> list[Finding]:
        address = address or "unknown"
        self._trim(now)
        times = self.failures.setdefault(address, deque())
        times.append(now)
        self.recent.append((now, address))
        count = len(times)
        evidence = {"source_address": address, "failures_in_window": count, "window_seconds": self.window}
        findings = []
        # One alert per address: low for the odd failure, escalated to high when the failures burst.
        burst = count >= self.threshold
        findings.append(
            Finding(
                "auth_failures",
                subject=address,
                summary=(
                    f"Brute force: {count} failed logins from {address} within {self.window:g} s"
                    if burst
                    else f"Failed login from {address}"
                ),
                evidence={**evidence, "brute_force": burst, "counts": {"failures": 1}},
                severity="high" if burst else "low",
            )
        )
        if len(self.failures) >= self.spray_addresses:
            findings.append(
                Finding(
                    "auth_spraying",
                    subject="fleet",
                    summary=f"Failed logins from {len(self.failures)} addresses within {self.window:g} s",
                    evidence={"addresses": sorted(self.failures)[:50], "counts": {"failures": 1}},
                )
            )
        return findings


# --- subscriptions ------------------------------------------------------------------------------------------


def subscription_violation(client_id: str, topic_filter: str, *, rx_prefix: str, rx_channels: tuple[str, ...]) -> str:
    """Why a device's subscription lies outside its own subtree ("" if it does not). The broker grants the SUBSCRIBE
    and filters deliveries, so the attempt itself is the signal."""
    own = f"{rx_prefix}/{client_id}/"
    if topic_filter == f"{own}#" or (topic_filter.startswith(own) and topic_filter[len(own) :] in rx_channels):
        return ""
    if topic_filter.startswith("$share/"):
        return "shared subscription"
    if topic_filter.startswith("$"):
        return "$SYS or another broker topic"
    if "#" in topic_filter or "+" in topic_filter:
        return "wildcard"
    parts = topic_filter.split("/")
    if len(parts) >= 2 and parts[1] != client_id:
        return "another device's topics"
    return "outside its own topics"


# --- connection fingerprints --------------------------------------------------------------------------------


def source_network(address: str) -> str:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    prefix = 24 if ip.version == 4 else 64
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


def fingerprint(event: LogEvent) -> str:
    return f"p{event.protocol} c{event.clean} k{event.keepalive} {source_network(event.address)}"


def fingerprint_verdict(history: list[str], new: str, *, clone_transitions: int = 3) -> str:
    """``history`` oldest first (without ``new``). "" (same as before or first), "changed", or "alternating" when the
    id switches back and forth between two fingerprints: two clients sharing one credential."""
    if not history or history[-1] == new:
        return ""
    sequence = [*history, new]
    transitions = sum(1 for a, b in zip(sequence, sequence[1:], strict=False) if a != b)
    if new in history and len(set(sequence)) == 2 and transitions >= clone_transitions:
        return "alternating"
    if new in history and transitions >= clone_transitions:
        return "alternating"
    return "changed"


# --- firmware -----------------------------------------------------------------------------------------------


def version_key(version: str) -> tuple:
    """``2.10.1`` > ``2.9`` (numeric parts compare as numbers; a suffix sorts before the plain release)."""
    parts = re.split(r"[.\-+_]", version.strip().lstrip("vV"))
    key: list[tuple[int, int | str]] = []
    for part in parts:
        key.append((1, int(part)) if part.isdigit() else (0, part))
    return tuple(key)


def firmware_verdict(running: str, *, latest: str, minimum: str) -> str:
    """ "below_minimum", "outdated" or ""."""
    if not running:
        return ""
    if minimum and version_key(running) < version_key(minimum):
        return "below_minimum"
    if latest and version_key(running) < version_key(latest):
        return "outdated"
    return ""
