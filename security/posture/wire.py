"""A small, bounded MQTT client for the posture audit (paho-mqtt 2, its own network thread per connection).

Every call takes a deadline; nothing here waits longer than it is told. Kept apart from the console's other clients
(the canary probe in security/brokers/files.py, the commander) because the audit connects as identities those never
use (anonymous, guessed credentials) and with MQTT 5, whose reason codes are the broker's own verdict on a publish.
No Django import: the checks and this module can be unit-tested alone.
"""

from __future__ import annotations

import contextlib
import ssl
import threading
import time
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt

NO_ANSWER, CLOSED = -1, -2


class Unreachable(Exception):
    """Nothing answers on the address (connection refused, timeout, TLS handshake failed)."""


@dataclass
class Identity:
    """Who the audit connects as. ``username=None``: anonymous."""

    label: str  # for evidence: "anonymous", "the console's probe identity", ...
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    client_id: str = ""


class AuditClient:
    """One connection. ``connect`` returns the CONNACK reason code (0 = accepted); messages are collected."""

    def __init__(
        self,
        host: str,
        port: int,
        identity: Identity,
        *,
        client_id: str,
        protocol: int = mqtt.MQTTv5,
        tls: ssl.SSLContext | None = None,
    ):
        self.host, self.port, self.identity = host, port, identity
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol, reconnect_on_failure=False
        )
        if identity.username is not None:
            self.client.username_pw_set(identity.username, identity.password)
        if tls is not None:
            self.client.tls_set_context(tls)
        self.client.max_queued_messages_set(0)
        self.connack = threading.Event()
        self.code: int | None = None
        self.connack_properties: dict = {}
        self.disconnected = threading.Event()
        self.disconnect_reason: str = ""
        self.messages: list[tuple[str, bytes, bool]] = []  # topic, payload, retain
        self.subacks: list[list[int]] = []
        self.pubacks: dict[int, int] = {}
        self._lock = threading.Lock()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self._started = False

    # --- callbacks (paho's thread) ---
    def _on_connect(self, _c, _u, _flags, reason, properties):
        self.code = reason.value if hasattr(reason, "value") else int(reason)
        if properties is not None:
            self.connack_properties = {
                k: v for k, v in properties.json().items() if k in ("MaximumPacketSize", "AssignedClientIdentifier")
            }
        self.connack.set()

    def _on_disconnect(self, _c, _u, _flags, reason, _p):
        self.disconnect_reason = str(reason)
        self.disconnected.set()
        self.connack.set()

    def _on_message(self, _c, _u, msg):
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def _on_subscribe(self, _c, _u, _mid, reason_codes, _p):
        with self._lock:
            self.subacks.append([getattr(r, "value", r) for r in reason_codes])

    def _on_publish(self, _c, _u, mid, reason, _p):
        with self._lock:
            self.pubacks[mid] = getattr(reason, "value", reason) or 0

    # --- calls ---
    def connect(self, timeout: float) -> int:
        """The CONNACK reason code (0 = accepted), NO_ANSWER, or CLOSED (the connection ended without a CONNACK: a
        TLS listener that wants a client certificate, a listener that speaks something else)."""
        try:
            if self.client._protocol == mqtt.MQTTv5:
                self.client.connect(self.host, self.port, keepalive=30, clean_start=True)
            else:
                self.client.connect(self.host, self.port, keepalive=30)
        except (TimeoutError, OSError, ssl.SSLError) as exc:
            raise Unreachable(f"{self.host}:{self.port}: {exc}") from exc
        self.client.loop_start()
        self._started = True
        if not self.connack.wait(max(0.05, timeout)):
            return NO_ANSWER
        return self.code if self.code is not None else CLOSED

    def subscribe(self, filters: list[str], timeout: float) -> list[int] | None:
        before = len(self.subacks)
        self.client.subscribe([(f, 1) for f in filters])
        if not wait_until(lambda: len(self.subacks) > before, timeout):
            return None
        return self.subacks[before]

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1):
        return self.client.publish(topic, payload, qos=qos, retain=retain)

    def puback(self, info, timeout: float) -> int | None:
        """The PUBACK reason code of a QoS 1 publish (v5: 0x87 = not authorised), or None if none came."""
        if not wait_until(lambda: info.mid in self.pubacks or self.disconnected.is_set(), timeout):
            return None
        return self.pubacks.get(info.mid)

    def received(self, payload: bytes) -> list[tuple[str, bytes, bool]]:
        with self._lock:
            return [m for m in self.messages if m[1] == payload]

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closing must never fail an audit
            if self.client.is_connected():
                self.client.disconnect()
        if self._started:
            self.client.loop_stop()
        with contextlib.suppress(OSError):
            sock = self.client.socket()
            if sock is not None:
                sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def wait_until(condition, timeout: float, step: float = 0.01) -> bool:
    deadline = time.monotonic() + max(0.0, timeout)
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(step)
