"""Posture checks about access: who may connect, what a client may read (judged by delivery, never by SUBACK) and what
it may write. Each takes the run's Context and returns a Finding (context.py); the catalogue is checks.py."""

from __future__ import annotations

import contextlib
import secrets
import time

from .context import (
    FAIL,
    PASS,
    SETTLE_SECONDS,
    UNKNOWN,
    CheckUnknown,
    Context,
    Finding,
    _code_text,
    _connected,
    _finding,
    _try_connect,
)
from .wire import CLOSED, NO_ANSWER, Identity, wait_until

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
