"""What Mosquitto itself says about device sessions, and clearing what a revoked device leaves behind (issue 5).

* ``SessionWatcher``: a short-lived subscriber to the broker's log (``$SYS/broker/log/N``, where Mosquitto 2.0.11
  writes connection messages) under its own identity (``settings.MQTT_SESSIONS_USERNAME``, read-only on that one
  topic; never the monitor's identity: ``use_username_as_clientid`` makes one username one session, so using the
  monitor's would kick the running consumer's monitor). It is subscribed *before* the reload that carries a
  revocation, and read until a marker the verifier makes *after* it, so it sees every session that reload dropped:
  a reload that de-authenticates a client logs ``Client <id> disconnected.`` (measured on 2.0.11, tested).
* ``purge_device_session``: connect as the revoked device (with a one-time secret the caller renders for it just
  for this), resume its stored session with a zero session expiry (MQTT 5: the broker discards the session and its
  queued messages when this connection ends), read the retained messages on its own channels and publish empty
  retained messages over exactly those.

Both speak MQTT through paho driven by ``mqtt_client.mqtt_step`` (epoll), like the canary.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .base import BrokerUnavailable
from .mqtt_client import connected_client, loop_until, mqtt_close, mqtt_step

LOG_TOPIC = "$SYS/broker/log/N"  # notice level: connections and disconnections
_TIMESTAMP_RE = re.compile(r"^(?P<ts>\d+): (?P<text>.*)$", re.S)
_DISCONNECT_RE = re.compile(
    r"^Client (?P<client_id>\S+) (?P<how>disconnected.*|closed its connection\.|has exceeded.*)$"
)
_CONNECTION_RE = re.compile(r"^New (?:connection|client connected) from (?P<address>\S+) (?:on port|as) ")
MAX_LINES = 20_000  # a reload with 100,000 connected devices would log more; the watcher keeps what it needs


@dataclass
class LogLine:
    received: float  # time.time() when the watcher received it (milliseconds matter: the broker logs whole seconds)
    broker_time: int | None
    text: str


@dataclass
class SessionWatcher:
    """One watcher per apply that carries revocations; see the module docstring."""

    host: str
    port: int
    username: str
    password: str
    client_ids: frozenset[str]
    lifetime: float = 60.0  # closes itself if nobody reads it (the apply failed, the process moved on)
    lines: list[LogLine] = field(default_factory=list)
    error: str = ""
    subscribed_at: float | None = None
    signalled_at: float | None = None

    def __post_init__(self):
        self._ready = threading.Event()
        self._done = threading.Event()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="fleetkeeper-session-watcher", daemon=True)

    # --- the connection, in its own thread -----------------------------------------------------------------

    def start(self) -> SessionWatcher:
        self._thread.start()
        return self

    def _run(self) -> None:
        client = None
        deadline = time.monotonic() + self.lifetime
        try:
            client, code = connected_client(
                self.host, self.port, username=self.username, password=self.password, timeout=3.0
            )
            if client is None:
                self.error = f"the session watcher's login was refused (code {code})"
                return
            client.on_message = self._on_message
            subscribed: list[bool] = []
            client.on_subscribe = lambda *_args: subscribed.append(True)
            client.subscribe(LOG_TOPIC, qos=0)
            loop_until(client, lambda: subscribed, min(deadline, time.monotonic() + 3.0))
            if not subscribed:
                self.error = "the broker did not confirm the session watcher's subscription"
                return
            self.subscribed_at = time.time()
            self._ready.set()
            while not self._done.is_set() and time.monotonic() < deadline:
                rc = mqtt_step(client, 0.01)
                if rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_AGAIN):
                    self.error = f"the session watcher's connection ended ({mqtt.error_string(rc)})"
                    return
        except BrokerUnavailable as exc:
            self.error = str(exc)
        except Exception as exc:  # evidence is best effort: never let it break an apply
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            if client is not None:
                with contextlib.suppress(Exception):
                    client.disconnect()
                    mqtt_step(client, 0.01)
                mqtt_close(client)
            self._ready.set()
            with self._cond:
                self._done.set()
                self._cond.notify_all()

    def _on_message(self, _client, _userdata, message) -> None:
        text = message.payload.decode("utf-8", "replace")
        match = _TIMESTAMP_RE.match(text)
        line = LogLine(
            received=time.time(),
            broker_time=int(match["ts"]) if match else None,
            text=match["text"] if match else text,
        )
        with self._cond:
            if len(self.lines) < MAX_LINES:
                self.lines.append(line)
            self._cond.notify_all()

    # --- what the apply and the verifier call --------------------------------------------------------------

    def wait_ready(self, timeout: float = 0.5) -> bool:
        """Called right before the reload signal. Bounded: a slow watcher costs a revocation at most ``timeout``
        (it has been connecting while the policy was built and written, so it is normally long ready)."""
        return self._ready.wait(timeout) and self.subscribed_at is not None

    def note_apply(self, result) -> None:
        self.signalled_at = result.timings.get("signalled_at") if result.reloaded else None

    def wait_for_connection_from(self, address: str, timeout: float = 2.0) -> bool:
        """Until the broker logged a connection from ``address`` (host:port): the verifier's own login after the
        reload. Everything the reload logged comes before it on this one subscription (in order)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    match = _CONNECTION_RE.match(line.text)
                    if match and match["address"] == address:
                        return True
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._done.is_set():
                    return False
                self._cond.wait(remaining)

    def session_evidence(self, client_id: str, *, marker_seen: bool) -> dict:
        """What the broker said about this device's session around the reload."""
        if client_id not in self.client_ids or self.subscribed_at is None:
            return {
                "observed": False,
                "state": "not_observed",
                "why": self.error or "no session watcher was subscribed to the broker's log at this reload",
            }
        with self._cond:
            lines = list(self.lines)
        for line in lines:
            match = _DISCONNECT_RE.match(line.text)
            if match and match["client_id"] == client_id:
                at = _iso_ms(line.received)
                evidence = {
                    "observed": True,
                    "state": "dropped",
                    "at": at,
                    "broker_time": line.broker_time,
                    "line": line.text,
                    "summary": f"session dropped at {at} (broker log: {line.text!r})",
                }
                if self.signalled_at is not None:
                    evidence["after_reload_signal_ms"] = round((line.received - self.signalled_at) * 1000, 1)
                return evidence
        if self.signalled_at is None:
            return {
                "observed": False,
                "state": "not_observed",
                "why": "this apply did not reload the broker (it had loaded these files already)",
            }
        if marker_seen:
            return {
                "observed": True,
                "state": "not_connected",
                "watched_from": _iso_ms(self.subscribed_at),
                "summary": "no live session: the broker logged no disconnect for it between the watcher's "
                "subscription (before the reload) and the verifier's login (after it)",
            }
        return {
            "observed": False,
            "state": "not_observed",
            "why": self.error or "the verifier's login did not show up in the broker's log in time",
        }

    def close(self) -> None:
        self._done.set()
        self._thread.join(timeout=2.0)


def _iso_ms(epoch: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")


# --- the purge ---------------------------------------------------------------------------------------------------


@dataclass
class PurgeOutcome:
    session_present: bool = False
    queued_discarded: int = 0  # queued messages the broker delivered to the purge before the session ended
    retained_cleared: list[str] = field(default_factory=list)
    error: str = ""

    def as_dict(self) -> dict:
        return {
            "session_present": self.session_present,
            "queued_discarded": self.queued_discarded,
            "retained_cleared": self.retained_cleared,
            "error": self.error,
        }


def purge_device_session(
    host: str, port: int, *, client_id: str, password: str, topics: list[str], timeout: float = 5.0
) -> PurgeOutcome:
    """Connect as ``client_id`` (MQTT 5, clean start off, session expiry 0): the CONNACK says whether the broker held
    a session for it; when this connection ends the broker discards that session and its queued messages. Then
    subscribe to ``topics`` (the device's own channels), collect the retained messages the broker sends, publish an
    empty retained message on exactly those topics (QoS 1, each acknowledged), and disconnect.

    Raises BrokerUnavailable when nobody listens; other failures are in ``error``."""
    outcome = PurgeOutcome()
    deadline = time.monotonic() + timeout
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.username_pw_set(client_id, password)
    connack: list[tuple[bool, int]] = []
    client.on_connect = lambda _c, _u, flags, reason, _p: connack.append((flags.session_present, reason.value))
    retained: dict[str, bool] = {}
    acks: list[int] = []
    clearing: list[bool] = []  # once set, what arrives is the echo of our own empty messages

    def on_message(_c, _u, message):
        if clearing:
            return
        if message.retain and message.payload:
            retained[message.topic] = True
        elif not message.retain:
            outcome.queued_discarded += 1

    client.on_message = on_message
    subscribed: list[int] = []
    client.on_subscribe = lambda _c, _u, mid, _codes, _p: subscribed.append(mid)
    client.on_publish = lambda _c, _u, mid, _reason, _p: acks.append(mid)
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = 0
    try:
        client.connect(host, port, keepalive=30, clean_start=False, properties=properties)
    except OSError as exc:
        raise BrokerUnavailable(f"The broker does not answer on {host}:{port} ({exc}).") from exc
    try:
        loop_until(client, lambda: connack, deadline)
        if not connack or connack[0][1] != 0:
            outcome.error = f"the purge login was refused (code {connack[0][1] if connack else 'none'})"
            return outcome
        outcome.session_present = connack[0][0]
        # Retained messages follow each SUBACK in order; a second SUBSCRIBE (to a topic the device may not read,
        # which Mosquitto grants and never delivers) is answered after them: its SUBACK means "all retained sent".
        _result, first = client.subscribe([(topic, 1) for topic in topics])
        _result, sync = client.subscribe(f"fleetkeeper/purge-sync/{client_id}", qos=0)
        loop_until(client, lambda: first in subscribed and sync in subscribed, deadline)
        if sync not in subscribed:
            outcome.error = "the broker did not answer the purge's subscriptions in time"
            return outcome
        clearing.append(True)
        mids = []
        for topic in sorted(retained):
            info = client.publish(topic, b"", qos=1, retain=True)
            mids.append(info.mid)
        loop_until(client, lambda: all(mid in acks for mid in mids), deadline)
        outcome.retained_cleared = sorted(retained) if all(mid in acks for mid in mids) else []
        if len(outcome.retained_cleared) != len(retained):
            outcome.error = "the broker did not acknowledge every empty retained message in time"
    except ConnectionError as exc:
        outcome.error = f"the purge connection ended early ({exc})"
    finally:
        with contextlib.suppress(Exception):
            client.disconnect()
            mqtt_step(client, 0.05)
        mqtt_close(client)
    return outcome


def connect_code_from(host: str, port: int, *, username: str, password: str, timeout: float = 2.0) -> tuple[int, str]:
    """``mqtt_client.connect_code`` that also says from which local address it connected (host:port, as the broker logs
    it), so a watcher can find this login in the broker's log."""
    client, code = connected_client(host, port, username=username, password=password, timeout=timeout)
    if client is None:
        return code, ""
    try:
        local = client.socket().getsockname()
        address = f"{local[0]}:{local[1]}"
    finally:
        client.disconnect()
        mqtt_step(client, 0.01)
        mqtt_close(client)
    return code, address
