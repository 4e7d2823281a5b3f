"""What every posture check shares: severities and outcomes, the ``Finding`` a check returns, the ``Target`` it probes,
the run's ``Context`` (clients, deadlines, the identities it may use) and the small connect helpers. The checks are in
access_checks.py and tls_checks.py, their catalogue (titles, severities, fixes) in checks.py. No Django import."""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

from .wire import CLOSED, NO_ANSWER, AuditClient, Identity

CRITICAL, HIGH, MEDIUM, LOW, INFO = "critical", "high", "medium", "low", "info"
SEVERITIES = (CRITICAL, HIGH, MEDIUM, LOW, INFO)
FAIL, PASS, UNKNOWN = "fail", "pass", "unknown"

# A handful of well-known defaults, tried once each: enough to catch a broker left as installed, never a brute force.
# (Each refused attempt is one "not authorised" line in the broker log; five stay at the detector's threshold, and the
# console's own probe logging in right after from the same address clears them, docs/detection.md.)
DEFAULT_CREDENTIALS: tuple[tuple[str, str], ...] = (
    ("admin", "admin"),
    ("admin", "password"),
    ("mosquitto", "mosquitto"),
    ("guest", "guest"),
    ("test", "test"),
)
SETTLE_SECONDS = 0.25  # after the control message arrived: time for a message routed earlier to show up too


@dataclass
class Finding:
    id: str
    title: str
    severity: str
    status: str
    evidence: dict = field(default_factory=dict)
    fix: str = ""
    duration_ms: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Target:
    """What to audit and with what. ``device`` is a callable returning the identity to act as a device with (called
    each time it is needed, inside ``device_lock``: the console's probe password changes with every policy apply)."""

    host: str
    port: int | None
    tls_port: int | None = None
    ca_file: str | None = None
    managed: bool = False
    device: Callable[[], Identity] | None = None
    device_own_topic: str = ""  # a topic the device identity may both write and read (its positive control)
    publisher: Identity | None = None  # may write <rx>/<any device>/<channel> (the console's commander)
    device_lock: Callable[[], contextlib.AbstractContextManager] | None = None
    publisher_lock: Callable[[], contextlib.AbstractContextManager] | None = None
    rx_prefix: str = "rx"
    tx_prefix: str = "tx"
    fleet_prefix: str = "device-"
    certificates_expected: bool = False
    # The rendered config binds the plain listener to loopback, for the console's identities only.
    plain_console_only: bool = False
    oversize_bytes: int = 1024 * 1024
    expiry_warning_days: int = 30
    default_credentials: tuple[tuple[str, str], ...] = DEFAULT_CREDENTIALS

    def describe(self) -> dict:
        return {
            "host": self.host,
            "port": self.port,
            "tls_port": self.tls_port,
            "ca_file": self.ca_file or "",
            "managed": self.managed,
            "device_identity": "yes" if self.device else "no",
        }


class CheckUnknown(Exception):
    """Raised inside a check: the check could not run; the message says why (it becomes an ``unknown`` finding)."""


@dataclass
class Context:
    target: Target
    check_timeout: float
    deadline: float
    nonce: str = field(default_factory=lambda: secrets.token_hex(4))
    memo: dict = field(default_factory=dict)

    def timeout(self) -> float:
        return max(0.2, min(self.check_timeout, self.deadline - time.monotonic()))

    @property
    def other_device(self) -> str:
        """A device id with the fleet prefix that no real device has: "another device" for the cross-device checks."""
        return f"{self.target.fleet_prefix}audit-{self.nonce}"

    def client_id(self, role: str) -> str:
        return f"fleetkeeper-audit-{role}-{self.nonce}"

    def client(self, identity: Identity, *, role: str, client_id: str | None = None, **kwargs) -> AuditClient:
        if self.target.port is None:
            raise CheckUnknown("no plain MQTT port to connect to")
        return AuditClient(
            self.target.host, self.target.port, identity, client_id=client_id or self.client_id(role), **kwargs
        )

    # --- who the audit can act as ---
    def anonymous_accepted(self) -> bool:
        if "anonymous" not in self.memo:
            self.memo["anonymous"] = _try_connect(self, Identity("anonymous"), role="anon")[0] == 0
        return self.memo["anonymous"]

    @contextlib.contextmanager
    def device_identity(self) -> Iterator[tuple[Identity, str]]:
        """(identity, a topic it may write and read). The configured device identity (the console's probe) inside
        its lock; else anonymous when the broker accepts it (every device can do what an anonymous client can)."""
        target = self.target
        if target.device is not None:
            lock = target.device_lock() if target.device_lock else contextlib.nullcontext()
            with lock:
                identity = target.device()
                yield identity, target.device_own_topic
            return
        if self.anonymous_accepted():
            yield Identity("anonymous (the broker accepts it, so any device can act as it)"), self.own_topic("anon")
            return
        raise CheckUnknown(
            "no device identity: the broker refuses anonymous clients and none was given (the console's own broker "
            "uses its probe identity; for another broker pass --username/--password)"
        )

    @contextlib.contextmanager
    def attacker_identity(self) -> Iterator[tuple[Identity, str]]:
        """The weakest identity that gets in: anonymous if accepted, else a device."""
        if self.anonymous_accepted():
            yield Identity("anonymous"), self.own_topic("anon")
            return
        with self.device_identity() as pair:
            yield pair

    def own_topic(self, role: str) -> str:
        return f"fleetkeeper-audit/{self.nonce}/{role}"

    @contextlib.contextmanager
    def publisher(self) -> Iterator[AuditClient]:
        """A connection that may write another device's topics: anonymous on a broker that accepts it, else the
        console's commander (inside its publishing lock)."""
        target = self.target
        if self.anonymous_accepted():
            identity, lock = Identity("anonymous"), contextlib.nullcontext()
            client_id = self.client_id("publisher")
        elif target.publisher is not None:
            identity = target.publisher
            lock = target.publisher_lock() if target.publisher_lock else contextlib.nullcontext()
            client_id = identity.client_id or identity.username or self.client_id("publisher")
        else:
            raise CheckUnknown(
                "nobody to publish the canary: the broker refuses anonymous clients and no identity that may write "
                "another device's topics was given"
            )
        with lock:
            client = self.client(identity, role="publisher", client_id=client_id)
            try:
                code = client.connect(self.timeout())
                if code != 0:
                    raise CheckUnknown(f"the canary publisher ({identity.label}) was refused: {_code_text(code)}")
                yield client
            finally:
                client.close()


def _code_text(code: int) -> str:
    if code == 0:
        return "accepted (CONNACK 0)"
    if code == NO_ANSWER:
        return "no CONNACK in time"
    if code == CLOSED:
        return "connection closed without a CONNACK"
    return f"refused (CONNACK reason {code:#04x})"


def _try_connect(ctx: Context, identity: Identity, *, role: str, client_id: str | None = None) -> tuple[int, dict]:
    client = ctx.client(identity, role=role, client_id=client_id)
    try:
        code = client.connect(ctx.timeout())
        return code, {"connack": _code_text(code), **client.connack_properties}
    finally:
        client.close()


def _connected(ctx: Context, identity: Identity, *, role: str, client_id: str | None = None) -> AuditClient:
    client = ctx.client(identity, role=role, client_id=client_id)
    code = client.connect(ctx.timeout())
    if code != 0:
        client.close()
        raise CheckUnknown(f"{identity.label} could not connect: {_code_text(code)}")
    return client


def _finding(check_id: str, status: str, evidence: dict, **overrides) -> Finding:
    from .checks import CHECKS  # the catalogue names every check (imported late: it imports the checks)

    spec = CHECKS[check_id]
    return Finding(
        id=check_id,
        title=spec.title,
        severity=overrides.get("severity", spec.severity),
        status=status,
        evidence=evidence,
        fix=overrides.get("fix", spec.fix),
    )
