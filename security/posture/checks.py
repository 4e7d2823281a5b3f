"""The posture audit's checks: one small function per check, each probing the broker the way an attacker would.

Every check gets the run's ``Context`` and returns a ``Finding``. A check judges by what the broker *does*
(delivers, acknowledges, disconnects), never by what it says it will do: Mosquitto 2.0.11 grants every SUBSCRIBE
under an ``acl_file`` and filters each message at delivery (mosquitto-notes.md), so a SUBACK proves nothing. A check
that cannot run, or whose positive control did not work, says ``unknown`` and why; it never says ``pass``.
docs/posture.md describes every check, what it proves and what it cannot see. No Django import here.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import secrets
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

from cryptography import x509

from .wire import CLOSED, NO_ANSWER, AuditClient, Identity, Unreachable, wait_until

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
    spec = CHECKS[check_id]
    return Finding(
        id=check_id,
        title=spec.title,
        severity=overrides.get("severity", spec.severity),
        status=status,
        evidence=evidence,
        fix=overrides.get("fix", spec.fix),
    )


# --- connecting -----------------------------------------------------------------------------------------------------


def check_anonymous_connect(ctx: Context) -> Finding:
    code, evidence = _try_connect(ctx, Identity("anonymous"), role="anon")
    ctx.memo["anonymous"] = code == 0
    ctx.memo["anonymous_connack"] = (code, evidence)
    evidence = {"sent": "CONNECT without username or password (MQTT 5)", "received": evidence}
    if code in (NO_ANSWER, CLOSED):
        return _finding("anonymous_connect", UNKNOWN, {**evidence, "why": "the broker did not answer the CONNECT"})
    return _finding("anonymous_connect", FAIL if code == 0 else PASS, evidence)


def check_default_credentials(ctx: Context) -> Finding:
    tried = []
    accepted = []
    for username, password in ctx.target.default_credentials:
        code, _ = _try_connect(ctx, Identity(f"{username}/{password}", username, password), role="default")
        tried.append({"username": username, "password": password, "connack": _code_text(code)})
        if code == 0:
            accepted.append(username)
    evidence = {
        "sent": f"{len(tried)} CONNECTs, one per well-known default (never a brute force)",
        "received": tried,
    }
    if accepted:
        return _finding("default_credentials", FAIL, {**evidence, "accepted": accepted})
    if all(t["connack"].startswith("no CONNACK") or t["connack"].startswith("connection closed") for t in tried):
        return _finding("default_credentials", UNKNOWN, {**evidence, "why": "the broker did not answer"})
    return _finding("default_credentials", PASS, evidence)


def check_client_id_outside_prefix(ctx: Context) -> Finding:
    """Anonymous: can it pick an id outside the fleet prefix? With a device identity: does the broker bind the id
    to the credential (a second connection with another made-up id takes the first one's session over) or take
    whatever id the client sends?"""
    prefix = ctx.target.fleet_prefix
    if ctx.anonymous_accepted():
        client_id = f"audit-{ctx.nonce}"
        code, received = _try_connect(ctx, Identity("anonymous"), role="id", client_id=client_id)
        evidence = {
            "sent": f"anonymous CONNECT with client id {client_id!r} (outside {prefix!r})",
            "received": received,
        }
        return _finding("client_id_outside_prefix", FAIL if code == 0 else PASS, evidence)
    with ctx.device_identity() as (identity, _own):
        first_id, second_id = f"audit-{ctx.nonce}-1", f"audit-{ctx.nonce}-2"
        first = _connected(ctx, identity, role="id", client_id=first_id)
        try:
            second = _connected(ctx, identity, role="id", client_id=second_id)
            try:
                taken_over = first.disconnected.wait(ctx.timeout())
            finally:
                second.close()
        finally:
            first.close()
    evidence = {
        "sent": f"two CONNECTs as {identity.label}, client ids {first_id!r} then {second_id!r} (outside {prefix!r})",
        "received": "the first connection was closed when the second came in: the broker replaced the requested id "
        "with the identity's own (use_username_as_clientid)"
        if taken_over
        else "both connections stayed up under the ids they asked for",
    }
    return _finding("client_id_outside_prefix", PASS if taken_over else FAIL, evidence)


# --- reading what is not yours (judged by delivery) -------------------------------------------------------------------


def _delivery_probe(
    ctx: Context,
    *,
    identity: Identity,
    own_topic: str,
    filters: list[str],
    canaries: list[str],
    retained: bool = False,
) -> dict:
    """Subscribe ``filters`` as ``identity``; have the publisher put a canary on each of ``canaries`` (topics the
    identity must not read); publish a control on ``own_topic`` (which it may read) and wait for it. Returns what
    was delivered. ``retained``: the canaries are retained and published before the subscription."""
    marker = f"fleetkeeper-posture-audit {ctx.nonce}".encode()
    canary_payloads = {topic: marker + b" canary " + topic.encode() for topic in canaries}
    control = marker + b" control " + secrets.token_hex(4).encode()
    evidence: dict = {"identity": identity.label, "subscribed": filters, "canary_topics": canaries}
    with ctx.publisher() as publisher:
        try:
            if retained:
                for topic, payload in canary_payloads.items():
                    publisher.puback(publisher.publish(topic, payload, retain=True), ctx.timeout())
            subscriber = _connected(ctx, identity, role="reader", client_id=identity.client_id or None)
            try:
                filters_all = [*filters, own_topic] if own_topic else filters
                suback = subscriber.subscribe(filters_all, ctx.timeout())
                evidence["suback"] = suback
                if suback is None:
                    raise CheckUnknown("no SUBACK in time")
                if not retained:
                    acks = {}
                    for topic, payload in canary_payloads.items():
                        acks[topic] = publisher.puback(publisher.publish(topic, payload), ctx.timeout())
                    evidence["canary_puback"] = acks
                control_code = subscriber.puback(subscriber.publish(own_topic, control), ctx.timeout())
                control_seen = wait_until(lambda: bool(subscriber.received(control)), ctx.timeout())
                time.sleep(SETTLE_SECONDS)
                evidence["control"] = {"topic": own_topic, "puback": control_code, "delivered": control_seen}
                with subscriber._lock:
                    messages = list(subscriber.messages)
            finally:
                subscriber.close()
        finally:
            if retained:
                for topic in canary_payloads:
                    with contextlib.suppress(Exception):
                        publisher.puback(publisher.publish(topic, b"", retain=True), 1.0)
    leaked = [t for t, p, _r in messages if p in canary_payloads.values()]
    foreign = sorted({t for t, p, _r in messages if t != own_topic and p not in canary_payloads.values()})
    evidence["canaries_delivered"] = leaked
    if foreign:
        evidence["other_topics_delivered"] = foreign[:20]
    return evidence


def _judge_delivery(check_id: str, evidence: dict) -> Finding:
    if evidence["canaries_delivered"] or evidence.get("other_topics_delivered"):
        return _finding(check_id, FAIL, evidence)
    if not evidence["control"]["delivered"]:
        return _finding(
            check_id,
            UNKNOWN,
            {
                **evidence,
                "why": "the identity's own control message was not delivered either, so silence proves nothing",
            },
        )
    return _finding(check_id, PASS, evidence)


def _wildcard(ctx: Context, check_id: str, topic_filter: str) -> Finding:
    canary = f"{ctx.target.rx_prefix}/{ctx.other_device}/command"
    with ctx.attacker_identity() as (identity, own_topic):
        evidence = _delivery_probe(
            ctx, identity=identity, own_topic=own_topic, filters=[topic_filter], canaries=[canary]
        )
    return _judge_delivery(check_id, evidence)


def check_wildcard_hash(ctx: Context) -> Finding:
    return _wildcard(ctx, "wildcard_hash", "#")


def check_wildcard_plus(ctx: Context) -> Finding:
    return _wildcard(ctx, "wildcard_plus", "+/#")


def _sys_delivery(ctx: Context, identity: Identity) -> dict:
    """$SYS needs no canary: Mosquitto retains $SYS/broker/version and friends, so a subscriber allowed to read them
    gets them at once."""
    client = _connected(ctx, identity, role="sys", client_id=identity.client_id or None)
    try:
        suback = client.subscribe(["$SYS/#"], ctx.timeout())
        wait_until(lambda: bool(client.messages), min(1.5, ctx.timeout()))
        with client._lock:
            topics = sorted({t for t, _p, _r in client.messages})
    finally:
        client.close()
    return {
        "identity": identity.label,
        "sent": "SUBSCRIBE $SYS/# (Mosquitto retains $SYS/broker/version: a reader allowed to see it gets it at once)",
        "suback": suback,
        "delivered_topics": topics[:20],
        "delivered_count": len(topics),
    }


def check_wildcard_sys(ctx: Context) -> Finding:
    with ctx.attacker_identity() as (identity, _own):
        evidence = _sys_delivery(ctx, identity)
    return _finding("wildcard_sys", FAIL if evidence["delivered_count"] else PASS, evidence)


def check_sys_readable_by_devices(ctx: Context) -> Finding:
    with ctx.device_identity() as (identity, _own):
        evidence = _sys_delivery(ctx, identity)
    return _finding("sys_readable_by_devices", FAIL if evidence["delivered_count"] else PASS, evidence)


def _read_other(ctx: Context, check_id: str, prefix: str, channel: str) -> Finding:
    """As a device, subscribe to another device's ``<prefix>/<id>/#`` and every device's channel; the canary goes on
    the other device's channel."""
    other = ctx.other_device
    with ctx.device_identity() as (identity, own_topic):
        evidence = _delivery_probe(
            ctx,
            identity=identity,
            own_topic=own_topic,
            filters=[f"{prefix}/{other}/#", f"{prefix}/+/{channel}"],
            canaries=[f"{prefix}/{other}/{channel}"],
        )
    return _judge_delivery(check_id, evidence)


def check_device_read_other_rx(ctx: Context) -> Finding:
    return _read_other(ctx, "device_read_other_rx", ctx.target.rx_prefix, "command")


def check_device_read_other_tx(ctx: Context) -> Finding:
    """Needs someone allowed to publish as another device: only an anonymous-open broker gives the audit that
    (the console's own identities never write a device's tx topics)."""
    if not ctx.anonymous_accepted():
        raise CheckUnknown(
            "no identity may publish on another device's tx topics (only that device may), so there is no canary to "
            "watch for; the rx check covers the same ACL rule for the console's rendered policy"
        )
    return _read_other(ctx, "device_read_other_tx", ctx.target.tx_prefix, "telemetry")


def check_retained_readable(ctx: Context) -> Finding:
    canary = f"{ctx.target.rx_prefix}/{ctx.other_device}/config"
    with ctx.attacker_identity() as (identity, own_topic):
        evidence = _delivery_probe(
            ctx, identity=identity, own_topic=own_topic, filters=["#"], canaries=[canary], retained=True
        )
    evidence["sent"] = "a retained canary on another device's topic, then a new subscriber to '#' (then cleared)"
    return _judge_delivery("retained_readable", evidence)


# --- writing what is not yours ---------------------------------------------------------------------------------------


def check_device_publish_other(ctx: Context) -> Finding:
    """MQTT 5 QoS 1: Mosquitto answers a denied publish with PUBACK 0x87; 0x00 or 0x10 (no subscribers) means it took
    the message (mosquitto-notes.md)."""
    other = ctx.other_device
    topics = [f"{ctx.target.rx_prefix}/{other}/command", f"{ctx.target.tx_prefix}/{other}/telemetry"]
    payload = f'{{"fleetkeeper_posture_audit": "{ctx.nonce}"}}'.encode()
    with ctx.device_identity() as (identity, _own):
        client = _connected(ctx, identity, role="writer", client_id=identity.client_id or None)
        try:
            acks = {topic: client.puback(client.publish(topic, payload), ctx.timeout()) for topic in topics}
        finally:
            client.close()
    evidence = {
        "identity": identity.label,
        "sent": "PUBLISH QoS 1 (MQTT 5) to another device's topics",
        "puback_reason": {t: (f"{c:#04x}" if c is not None else None) for t, c in acks.items()},
    }
    if any(code is not None and code < 0x80 for code in acks.values()):
        return _finding("device_publish_other", FAIL, evidence)
    if any(code is None for code in acks.values()):
        return _finding("device_publish_other", UNKNOWN, {**evidence, "why": "no PUBACK in time"})
    return _finding("device_publish_other", PASS, evidence)


def check_oversize_publish(ctx: Context) -> Finding:
    size = ctx.target.oversize_bytes
    with ctx.device_identity() as (identity, own_topic):
        client = _connected(ctx, identity, role="oversize", client_id=identity.client_id or None)
        try:
            advertised = client.connack_properties.get("MaximumPacketSize")
            if client.subscribe([own_topic], ctx.timeout()) is None:
                raise CheckUnknown("no SUBACK in time")
            small = f"fleetkeeper-posture-audit {ctx.nonce} small".encode()
            client.publish(own_topic, small)
            if not wait_until(lambda: bool(client.received(small)), ctx.timeout()):
                raise CheckUnknown(f"a small message on {own_topic} was not delivered either")
            big = f"fleetkeeper-posture-audit {ctx.nonce} big ".encode().ljust(size, b"x")
            code = client.puback(client.publish(own_topic, big), ctx.timeout())
            delivered = wait_until(
                lambda: bool(client.received(big)) or client.disconnected.is_set(), min(2.0, ctx.timeout())
            )
            delivered = bool(client.received(big))
            dropped_connection = client.disconnected.is_set()
            reason = client.disconnect_reason
        finally:
            client.close()
    evidence = {
        "identity": identity.label,
        "sent": f"PUBLISH of {size} bytes to {own_topic} (a topic it may write and read)",
        "broker_maximum_packet_size": advertised,
        "puback_reason": f"{code:#04x}" if code is not None else None,
        "delivered": delivered,
        "disconnected": f"yes ({reason})" if dropped_connection else "no",
    }
    if delivered:
        return _finding("oversize_publish", FAIL, evidence)
    return _finding("oversize_publish", PASS, evidence)


# --- listeners and TLS -----------------------------------------------------------------------------------------------


def _tls_context(*, minimum=None, maximum=None, verify_ca: str | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    if verify_ca:
        context.load_verify_locations(cafile=verify_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.verify_mode = ssl.CERT_NONE
    if minimum is not None or maximum is not None:
        # Old protocol versions need the lowest security level for OpenSSL 3 to offer them at all.
        context.set_ciphers("ALL:@SECLEVEL=0")
        with _quiet_deprecation():
            if minimum is not None:
                context.minimum_version = minimum
            if maximum is not None:
                context.maximum_version = maximum
    return context


@contextlib.contextmanager
def _quiet_deprecation():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def _handshake(ctx: Context, context: ssl.SSLContext) -> tuple[str | None, bytes | None, str]:
    """(negotiated version, server certificate DER, error)."""
    target = ctx.target
    try:
        with socket.create_connection((target.host, target.tls_port), timeout=ctx.timeout()) as raw:
            with context.wrap_socket(raw, server_hostname=target.host) as tls:
                return tls.version(), tls.getpeercert(binary_form=True), ""
    except ssl.SSLError as exc:
        return None, None, f"{exc.reason or exc}"
    except OSError as exc:
        return None, None, f"{type(exc).__name__}: {exc}"


def _require_tls(ctx: Context) -> None:
    target = ctx.target
    if not target.tls_port:
        raise CheckUnknown("no TLS port to audit (none configured or given)")
    if "tls" not in ctx.memo:
        version, _der, error = _handshake(ctx, _tls_context())
        ctx.memo["tls"] = (version, error)
    version, error = ctx.memo["tls"]
    if version is None:
        raise CheckUnknown(f"no TLS handshake on {target.host}:{target.tls_port}: {error}")


CLIENT_SIDE_REFUSALS = ("NO_PROTOCOLS_AVAILABLE", "NO_CIPHERS_AVAILABLE")


def check_tls_old_versions(ctx: Context) -> Finding:
    _require_tls(ctx)
    results = {}
    accepted = []
    for name, version in (("TLSv1.0", ssl.TLSVersion.TLSv1), ("TLSv1.1", ssl.TLSVersion.TLSv1_1)):
        try:
            context = _tls_context(minimum=version, maximum=version)
        except (ValueError, ssl.SSLError) as exc:
            raise CheckUnknown(f"this machine's OpenSSL cannot offer {name}: {exc}") from exc
        negotiated, _der, error = _handshake(ctx, context)
        if any(marker in error for marker in CLIENT_SIDE_REFUSALS):
            raise CheckUnknown(f"this machine's OpenSSL refused to offer {name} ({error})")
        results[name] = f"accepted ({negotiated})" if negotiated else f"refused: {error}"
        if negotiated:
            accepted.append(name)
    evidence = {"sent": "TLS handshakes offering only TLS 1.0, then only TLS 1.1", "received": results}
    return _finding("tls_old_versions", FAIL if accepted else PASS, evidence)


def check_tls_certificate_expiry(ctx: Context) -> Finding:
    _require_tls(ctx)
    _version, der, error = _handshake(ctx, _tls_context())
    if der is None:
        raise CheckUnknown(f"no server certificate: {error}")
    certificate = x509.load_der_x509_certificate(der)
    not_after = certificate.not_valid_after_utc
    days_left = (not_after - dt.datetime.now(dt.UTC)).total_seconds() / 86400
    evidence = {
        "subject": certificate.subject.rfc4514_string(),
        "issuer": certificate.issuer.rfc4514_string(),
        "not_after": not_after.isoformat(),
        "days_left": round(days_left, 1),
    }
    if ctx.target.ca_file:
        verified, _der, verify_error = _handshake(ctx, _tls_context(verify_ca=ctx.target.ca_file))
        evidence["verified_against_ca"] = "yes" if verified else f"no: {verify_error}"
    if days_left < 0:
        return _finding("tls_certificate_expiry", FAIL, evidence, severity=CRITICAL)
    if days_left < ctx.target.expiry_warning_days:
        return _finding("tls_certificate_expiry", FAIL, evidence)
    if evidence.get("verified_against_ca", "yes") != "yes":
        return _finding(
            "tls_certificate_expiry",
            FAIL,
            evidence,
            fix="The broker's certificate does not chain to the fleet's CA: devices verifying it will refuse to "
            "connect. Re-issue it from the PKI page (docs/pki.md).",
        )
    return _finding("tls_certificate_expiry", PASS, evidence)


def check_tls_client_certificate(ctx: Context) -> Finding:
    _require_tls(ctx)
    target = ctx.target
    client = AuditClient(
        target.host, target.tls_port, Identity("anonymous over TLS"), client_id=ctx.client_id("tls"), tls=_tls_context()
    )
    try:
        try:
            code = client.connect(ctx.timeout())
        except Unreachable as exc:
            code, reason = CLOSED, str(exc)
        else:
            reason = client.disconnect_reason
    finally:
        client.close()
    evidence = {
        "sent": "TLS handshake without a client certificate, then an anonymous CONNECT",
        "received": _code_text(code) + (f" ({reason})" if reason and code != 0 else ""),
    }
    required = code in (CLOSED, NO_ANSWER)
    if required:
        return _finding("tls_client_certificate", PASS, evidence)
    if not target.certificates_expected:
        evidence["note"] = "the listener does not require certificates and the fleet does not say it uses them"
        return _finding("tls_client_certificate", PASS, evidence, severity=INFO)
    return _finding("tls_client_certificate", FAIL, evidence)


def check_plain_listener(ctx: Context) -> Finding:
    target = ctx.target
    if target.port is None:
        raise CheckUnknown("no plain MQTT port given")
    # The anonymous check's answer when it ran: one refused login fewer in the broker's log (and the detector's).
    code, received = ctx.memo.get("anonymous_connack") or _try_connect(ctx, Identity("anonymous"), role="plain")
    speaks_mqtt = code not in (NO_ANSWER, CLOSED)
    tls_available = False
    if target.tls_port:
        version, _der, _error = _handshake(ctx, _tls_context())
        tls_available = version is not None
    evidence = {
        "sent": f"a plain-text CONNECT to {target.host}:{target.port}",
        "received": received,
        "tls_listener": f"{target.host}:{target.tls_port} answers TLS" if tls_available else "none reachable",
    }
    if not speaks_mqtt:
        return _finding("plain_listener", PASS, evidence)
    if target.plain_console_only:
        evidence["note"] = (
            "the rendered config binds this listener to 127.0.0.1 and renders no device password on it: only the "
            "console's own identities use it (MQTT_PLAIN_LISTENER is off)"
        )
        return _finding("plain_listener", PASS, evidence)
    if not tls_available:
        return _finding(
            "plain_listener",
            FAIL,
            evidence,
            severity=HIGH,
            fix="There is no TLS listener at all: credentials and messages cross the network in clear. Turn on the "
            "TLS listener (MQTT_TLS_LISTENER) and move devices to it.",
        )
    return _finding("plain_listener", FAIL, evidence)


# --- the catalogue ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckSpec:
    id: str
    title: str
    severity: str
    fix: str
    run: Callable[[Context], Finding]


CHECKS: dict[str, CheckSpec] = {
    spec.id: spec
    for spec in (
        CheckSpec(
            "anonymous_connect",
            "Anonymous clients can connect",
            CRITICAL,
            "Set `allow_anonymous false` (the console's rendered config does); every client must authenticate.",
            check_anonymous_connect,
        ),
        CheckSpec(
            "default_credentials",
            "Well-known default credentials are accepted",
            CRITICAL,
            "Remove the default account from the password file, or give it a long random secret.",
            check_default_credentials,
        ),
        CheckSpec(
            "client_id_outside_prefix",
            "A client can connect under an id of its own choosing, outside the fleet prefix",
            MEDIUM,
            "Set `use_username_as_clientid true` so a credential is bound to one client id, and refuse anonymous "
            "clients.",
            check_client_id_outside_prefix,
        ),
        CheckSpec(
            "wildcard_hash",
            "Subscribing to '#' delivers other clients' messages",
            HIGH,
            "Use a deny-by-default ACL (acl_file with per-device patterns, never an empty file) so each message is "
            "delivered only to who may read it.",
            check_wildcard_hash,
        ),
        CheckSpec(
            "wildcard_plus",
            "Subscribing to '+/#' delivers other clients' messages",
            HIGH,
            "Use a deny-by-default ACL (acl_file with per-device patterns) so each message is delivered only to who "
            "may read it.",
            check_wildcard_plus,
        ),
        CheckSpec(
            "wildcard_sys",
            "Subscribing to '$SYS/#' delivers the broker's internals to the weakest identity",
            MEDIUM,
            "Grant $SYS only to the console's monitor identity in the ACL.",
            check_wildcard_sys,
        ),
        CheckSpec(
            "device_read_other_rx",
            "A device can read another device's receive (rx) topics",
            HIGH,
            "Grant devices only `pattern read <rx>/%u/<channel>` lines (their own channels) in the ACL.",
            check_device_read_other_rx,
        ),
        CheckSpec(
            "device_read_other_tx",
            "A device can read another device's transmit (tx) topics",
            HIGH,
            "Give devices no read grant on the tx topics; only the console's consumer reads them.",
            check_device_read_other_tx,
        ),
        CheckSpec(
            "device_publish_other",
            "A device can publish on another device's topics (forge its telemetry or commands)",
            CRITICAL,
            "Grant devices only `pattern write <tx>/%u/<channel>` lines in the ACL; commands come from the console's "
            "commander identity only.",
            check_device_publish_other,
        ),
        CheckSpec(
            "oversize_publish",
            "Oversize messages are accepted and delivered",
            MEDIUM,
            "Set `max_packet_size` (the console renders MQTT_MAX_PACKET_SIZE) so an oversize packet disconnects its "
            "sender.",
            check_oversize_publish,
        ),
        CheckSpec(
            "retained_readable",
            "Retained messages on other devices' topics are readable by everyone",
            MEDIUM,
            "Use a deny-by-default ACL: retained messages are then delivered only to who may read their topic.",
            check_retained_readable,
        ),
        CheckSpec(
            "sys_readable_by_devices",
            "Devices can read $SYS (broker statistics and, with log_dest topic, its log)",
            MEDIUM,
            "Grant $SYS only to the console's monitor identity; give devices no read grant outside their rx channels.",
            check_sys_readable_by_devices,
        ),
        CheckSpec(
            "plain_listener",
            "A plain-text MQTT listener is open while TLS is available",
            MEDIUM,
            "Once devices use certificates, turn the plain listener off for devices (MQTT_PLAIN_LISTENER=false binds "
            "it to 127.0.0.1 for the console's identities only).",
            check_plain_listener,
        ),
        CheckSpec(
            "tls_old_versions",
            "The TLS listener accepts TLS 1.0 or 1.1",
            HIGH,
            "Set `tls_version tlsv1.2` (or tlsv1.3) on the TLS listener (the console's rendered config does).",
            check_tls_old_versions,
        ),
        CheckSpec(
            "tls_certificate_expiry",
            "The broker's TLS certificate is expired or expires soon",
            HIGH,
            "Renew the broker's server certificate before it expires (PKI page, docs/pki.md); devices refuse an "
            "expired one.",
            check_tls_certificate_expiry,
        ),
        CheckSpec(
            "tls_client_certificate",
            "The TLS listener accepts clients without a certificate",
            HIGH,
            "Set `require_certificate true` and `use_identity_as_username true` on the TLS listener.",
            check_tls_client_certificate,
        ),
    )
}
