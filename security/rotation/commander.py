"""Publishing commands to devices (rx/<id>/<channel>) from Celery tasks.

The broker runs with ``use_username_as_clientid true``: one username is one session, and a second connection with the
same username takes the first one over. So the console has one identity for commands (``fleetkeeper-commander``,
write-only on the rx channels, rendered by security/brokers/render.py), and only one process uses it at a time: a
Redis lock is held around a short-lived connection that publishes a whole chunk at QoS 1 and waits for every PUBACK.
A chunk of 1,000 messages takes well under a second, so workers queue behind the lock briefly instead of kicking
each other off the broker. MQTT 5 is used where the broker speaks it (``capabilities()["mqtt5"]``), because a denied
publish then gets a PUBACK with reason 0x87 (Mosquitto's v3.1.1 acknowledges it as if it were delivered,
mosquitto-notes.md), so an ACL mistake shows as a failed delivery. RabbitMQ 3.10 speaks 3.1.1 only, and closes the
connection on a denied publish: what was not acknowledged before that is reported as not delivered.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass

import paho.mqtt.client as mqtt
import redis
from django.conf import settings

from security.brokers import broker_capabilities

log = logging.getLogger(__name__)

COMMANDER_LOCK = "fleetkeeper:commander"


class CommanderUnavailable(Exception):
    """The broker refused or did not answer, or the publishing lock could not be had: nothing was sent (or not
    everything was acknowledged); the caller retries later."""


@dataclass(frozen=True)
class Outcome:
    """Per message: True when the broker acknowledged it (PUBACK without an error reason)."""

    acknowledged: list[bool]
    errors: dict[int, str]
    sealed: int = 0  # how many went out sealed to the device's payload key

    @property
    def count(self) -> int:
        return sum(self.acknowledged)


@contextlib.contextmanager
def _commander_lock(timeout: float):
    client = redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=2)
    lock = client.lock(COMMANDER_LOCK, timeout=max(30, int(timeout * 4)), blocking_timeout=timeout)
    try:
        acquired = lock.acquire()
    except redis.ConnectionError as exc:
        # No Redis: no Celery either, so no second worker to fight with; a lone caller may publish.
        log.warning("Redis unreachable (%s): publishing commands without the cross-worker lock", exc)
        yield
        return
    if not acquired:
        raise CommanderUnavailable("another worker held the command publishing lock for too long")
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            lock.release()


def publish(messages: list[tuple[str, bytes]], *, timeout: float | None = None) -> Outcome:
    """Publish (topic, payload) pairs at QoS 1 through the commander identity; wait for the broker's PUBACKs.

    Raises CommanderUnavailable when the connection fails. Messages not acknowledged within the timeout are reported
    as not acknowledged (the caller keeps them pending and re-sends)."""
    if not messages:
        return Outcome([], {})
    messages, sealed = _sealed(messages)
    timeout = settings.ROTATION_PUBLISH_TIMEOUT if timeout is None else timeout
    with _commander_lock(timeout):
        outcome = _publish_locked(messages, timeout=timeout)
    return dataclasses.replace(outcome, sealed=sealed)


def _sealed(messages: list[tuple[str, bytes]]) -> tuple[list[tuple[str, bytes]], int]:
    """Every message to a device that has a payload key goes out sealed to it (docs/device-protocol.md, section 10):
    credentials, certificate renewals, firmware offers alike, whoever sends them. The others stay as they are."""
    from security import topics
    from security.payloads import payload_seal_many

    targets = [(i, topics.rx_client_id(topic)) for i, (topic, _payload) in enumerate(messages)]
    targets = [(i, client_id) for i, client_id in targets if client_id]
    if not targets:
        return messages, 0
    sealed = payload_seal_many(items=[(client_id, messages[i][0], messages[i][1]) for i, client_id in targets])
    out = list(messages)
    for (i, _client_id), envelope in zip(targets, sealed, strict=True):
        if envelope is not None:
            out[i] = (out[i][0], envelope)
    return out, sum(1 for envelope in sealed if envelope is not None)


def _publish_locked(messages: list[tuple[str, bytes]], *, timeout: float) -> Outcome:
    username = settings.MQTT_COMMANDER_USERNAME
    protocol = mqtt.MQTTv5 if broker_capabilities().get("mqtt5") else mqtt.MQTTv311
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=username, protocol=protocol, reconnect_on_failure=False
    )
    client.username_pw_set(username, settings.MQTT_COMMANDER_PASSWORD)
    client.max_inflight_messages_set(max(20, settings.MQTT_MAX_INFLIGHT_MESSAGES))
    client.max_queued_messages_set(0)
    connected = threading.Event()
    refused: list[str] = []
    done = threading.Event()
    acked: dict[int, bool] = {}
    errors: dict[int, str] = {}
    index_of: dict[int, int] = {}
    expected = len(messages)

    def on_connect(_client, _userdata, _flags, reason, _props):
        if reason.is_failure:
            refused.append(str(reason))
        connected.set()

    def on_publish(_client, _userdata, mid, reason, _props):
        # No lock of ours here: paho calls this holding its own message mutex, which publish() also takes.
        code = getattr(reason, "value", reason) or 0
        if code >= 0x80:
            errors[mid] = str(reason)
        acked[mid] = code < 0x80
        if len(acked) >= expected:
            done.set()

    client.on_connect = on_connect
    client.on_publish = on_publish
    # Dropped by the broker (RabbitMQ ends the connection on a denied publish): no more acknowledgements will come.
    client.on_disconnect = lambda *_args: done.set()
    try:
        client.connect(settings.MQTT_HOST, settings.MQTT_PORT, keepalive=30)
    except OSError as exc:
        raise CommanderUnavailable(
            f"cannot reach the broker at {settings.MQTT_HOST}:{settings.MQTT_PORT}: {exc}"
        ) from exc
    client.loop_start()
    try:
        if not connected.wait(timeout) or refused:
            raise CommanderUnavailable(
                f"the broker refused the commander identity {username!r}: {refused[0] if refused else 'no CONNACK'}"
            )
        for i, (topic, payload) in enumerate(messages):
            info = client.publish(topic, payload, qos=1)
            index_of[info.mid] = i
        deadline = time.monotonic() + timeout
        while not done.wait(0.05):
            if time.monotonic() > deadline:
                break
    finally:
        with contextlib.suppress(Exception):
            client.disconnect()
        client.loop_stop()
    result = [False] * expected
    failures: dict[int, str] = {}
    for mid, ok in acked.items():
        i = index_of.get(mid)
        if i is None:
            continue
        result[i] = ok
        if mid in errors:
            failures[i] = errors[mid]
    return Outcome(result, failures)
