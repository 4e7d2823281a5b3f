"""A lean MQTT 3.1.1 subscriber for the consumer's telemetry connection.

Why not paho: paho builds an MQTTMessage, takes its locks and calls back once per message, and its network thread
reads the socket in small pieces. At tens of thousands of messages a second that per-message machinery, not the
detectors, was most of the consumer's cost (docs/benchmarks.md, "Ingest"). This client does only what a subscriber
needs: CONNECT with a username, SUBSCRIBE, PUBLISH in (QoS 0 and 1), PUBACK out, PINGREQ keepalive, reconnect with
backoff. It reads up to ``recv_size`` bytes at a time and hands every complete PUBLISH in them to one callback call,
so the consumer folds a whole read under one lock. QoS 1 messages are acknowledged after the callback returned.

Anything the broker sends that is not valid MQTT for a subscriber (a bad remaining length, a truncated PUBLISH, QoS 3,
an unexpected packet type) is a ``FrameError``: the connection is dropped and made again, the consumer keeps
running. The broker-log monitor, a few lines a second, stays on paho.
"""

from __future__ import annotations

import logging
import random
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("fleetkeeper.consumer")

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK = 0x10, 0x20, 0x30, 0x40, 0x82, 0x90
PINGREQ, PINGRESP, DISCONNECT = 0xC0, 0xD0, 0xE0
MAX_REMAINING_LENGTH = 268_435_455  # four varint bytes, the protocol's ceiling
CONNACK_REASONS = {
    1: "unacceptable protocol version",
    2: "client identifier rejected",
    3: "server unavailable",
    4: "bad username or password",
    5: "not authorised",
}


class FrameError(Exception):
    """The byte stream is not valid MQTT for a subscriber: drop the connection and reconnect. ``publishes`` holds
    the valid PUBLISH frames that came before the bad bytes in the same read (still delivered)."""

    publishes: list = []


class Refused(Exception):
    """The broker refused the CONNECT (CONNACK return code) or a subscription (SUBACK 0x80)."""


# (topic, payload, qos, packet id); packet id 0 for QoS 0
Publish = tuple[bytes, bytes, int, int]


def encode_remaining_length(n: int) -> bytes:
    if not 0 <= n <= MAX_REMAINING_LENGTH:
        raise ValueError(f"remaining length {n} out of range")
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return struct.pack("!H", len(data)) + data


def connect_packet(*, client_id: str, username: str, password: str, keepalive: int, clean: bool = True) -> bytes:
    flags = 0xC0 | (0x02 if clean else 0)  # username, password, clean session
    body = _string("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive)
    body += _string(client_id) + _string(username) + _string(password)
    return bytes([CONNECT]) + encode_remaining_length(len(body)) + body


def subscribe_packet(packet_id: int, subscriptions: list[tuple[str, int]]) -> bytes:
    body = struct.pack("!H", packet_id) + b"".join(_string(f) + bytes([qos]) for f, qos in subscriptions)
    return bytes([SUBSCRIBE]) + encode_remaining_length(len(body)) + body


def publish_packet(topic: str | bytes, payload: bytes, *, qos: int = 0, packet_id: int = 0) -> bytes:
    """A PUBLISH frame (tests and tools; the subscriber never publishes)."""
    body = _string(topic) + (struct.pack("!H", packet_id) if qos else b"") + payload
    return bytes([PUBLISH | (qos << 1)]) + encode_remaining_length(len(body)) + body


def puback_packet(packet_id: int) -> bytes:
    return b"\x40\x02" + struct.pack("!H", packet_id)


class FrameReader:
    """Splits a byte stream into MQTT frames. ``feed`` takes whatever recv returned and gives back the complete
    PUBLISH frames in it, parsed, and the other frames as (first byte, body); an incomplete frame waits for the next
    feed. Raises FrameError on bytes that cannot be MQTT (the stream cannot be resynchronised after that)."""

    def __init__(self, max_frame: int = 16 * 1024 * 1024):
        self.max_frame = max_frame
        self._rest = b""

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held for the next feed."""
        return len(self._rest)

    def feed(self, chunk: bytes) -> tuple[list[Publish], list[tuple[int, bytes]]]:
        data = self._rest + chunk if self._rest else chunk
        n = len(data)
        publishes: list[Publish] = []
        others: list[tuple[int, bytes]] = []
        try:
            pos = self._split(data, publishes, others)
        except FrameError as exc:
            self._rest = b""
            exc.publishes = publishes
            raise
        self._rest = data[pos:] if pos < n else b""
        if len(self._rest) > self.max_frame + 5:
            raise FrameError("incomplete frame over the limit")
        return publishes, others

    def _split(self, data: bytes, publishes: list[Publish], others: list[tuple[int, bytes]]) -> int:
        """Appends every complete frame of ``data``; returns where the incomplete rest starts."""
        n = len(data)
        pos = 0
        max_frame = self.max_frame
        while pos + 2 <= n:
            header = data[pos]
            i = pos + 1
            byte = data[i]
            length = byte & 0x7F
            if byte & 0x80:  # remaining length continues: at most four bytes in all
                shift = 7
                while byte & 0x80:
                    i += 1
                    if i - pos > 4:
                        raise FrameError("remaining length longer than four bytes")
                    if i >= n:
                        break
                    byte = data[i]
                    length |= (byte & 0x7F) << shift
                    shift += 7
                if byte & 0x80:  # the length itself is not complete yet
                    break
            if length > max_frame:
                raise FrameError(f"frame of {length} bytes over the {max_frame}-byte limit")
            start = i + 1
            end = start + length
            if end > n:
                break
            if header & 0xF0 == PUBLISH:
                qos = (header >> 1) & 3
                if length < 2:
                    raise FrameError("PUBLISH without a topic")
                topic_end = start + 2 + ((data[start] << 8) | data[start + 1])
                if qos:
                    if qos == 3:
                        raise FrameError("PUBLISH with QoS 3")
                    if topic_end + 2 > end:
                        raise FrameError("PUBLISH shorter than its topic and packet id")
                    packet_id = (data[topic_end] << 8) | data[topic_end + 1]
                    if not packet_id:
                        raise FrameError("QoS 1 PUBLISH with packet id 0")
                    publishes.append((data[start + 2 : topic_end], data[topic_end + 2 : end], qos, packet_id))
                else:
                    if topic_end > end:
                        raise FrameError("PUBLISH shorter than its topic")
                    publishes.append((data[start + 2 : topic_end], data[topic_end:end], 0, 0))
            else:
                others.append((header, data[start:end]))
            pos = end
        return pos


@dataclass
class SubscriberStats:
    sessions: int = 0
    refusals: int = 0
    protocol_errors: int = 0
    disconnects: int = 0
    last_error: str = ""


class Subscriber:
    """One MQTT 3.1.1 session in its own thread, remade with exponential backoff (1 s doubling to
    ``reconnect_max``, with jitter) whenever it fails. ``on_publishes`` gets a list of Publish per read; for QoS 1
    the PUBACKs are sent after it returns. An exception from it is logged and counted by the caller's contract:
    it must not raise (the consumer catches per message)."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        username: str,
        password: str,
        subscriptions: list[tuple[str, int]],
        on_publishes: Callable[[list[Publish]], None],
        client_id: str | None = None,
        keepalive: int = 30,
        reconnect_max: float = 10.0,
        recv_size: int = 256 * 1024,
        max_frame: int = 16 * 1024 * 1024,
        name: str = "mqtt-subscriber",
        connect_timeout: float = 10.0,
    ):
        self.host, self.port = host, port
        self.username, self.password = username, password
        self.client_id = client_id or username
        self.subscriptions = subscriptions
        self.on_publishes = on_publishes
        self.keepalive = keepalive
        self.reconnect_max = max(1.0, reconnect_max)
        self.recv_size = recv_size
        self.max_frame = max_frame
        self.name = name
        self.connect_timeout = connect_timeout
        self.stats = SubscriberStats()
        self._stop = threading.Event()
        self._subscribed = threading.Event()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle
    def start(self) -> Subscriber:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        sock = self._sock
        if sock is not None:
            try:
                sock.sendall(bytes([DISCONNECT, 0]))
            except OSError:
                pass
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout)

    def is_connected(self) -> bool:
        """Connected and subscribed."""
        return self._subscribed.is_set()

    def wait_subscribed(self, timeout: float) -> bool:
        return self._subscribed.wait(timeout)

    # --- the session loop
    def _run(self) -> None:
        delay = 1.0
        while not self._stop.is_set():
            established = False
            try:
                established = self._session()
            except Refused as exc:
                self.stats.refusals += 1
                self.stats.last_error = str(exc)
                log.warning("%s refused by the broker: %s (retrying in %.0f s)", self.username, exc, delay)
            except FrameError as exc:
                self.stats.protocol_errors += 1
                self.stats.last_error = f"protocol error: {exc}"
                log.warning("%s: invalid MQTT from the broker (%s); reconnecting", self.username, exc)
            except OSError as exc:
                if not self._stop.is_set():
                    self.stats.disconnects += 1
                    self.stats.last_error = f"{type(exc).__name__}: {exc}"
                    log.warning("%s lost its connection (%s); reconnecting", self.username, exc)
            except Exception as exc:  # a bug must not end the thread: the consumer would stop hearing the fleet
                self.stats.disconnects += 1
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("%s: unexpected error; reconnecting", self.username)
            finally:
                established = established or self._subscribed.is_set()
                self._subscribed.clear()
                sock, self._sock = self._sock, None
                if sock is not None:
                    sock.close()
            if established:
                delay = 1.0
            if self._stop.wait(delay * random.uniform(0.8, 1.2)):
                break
            if not established:
                delay = min(delay * 2, self.reconnect_max)

    def _session(self) -> bool:
        """One connection, until it fails or stop(). Returns whether it got as far as being subscribed."""
        sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        self._sock = sock
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # No SO_RCVBUF: setting it turns off the kernel's receive-buffer autotuning (up to tcp_rmem's maximum),
        # and a small fixed buffer makes the broker's writes block sooner.
        reader = FrameReader(self.max_frame)
        sock.sendall(
            connect_packet(
                client_id=self.client_id, username=self.username, password=self.password, keepalive=self.keepalive
            )
        )
        # Nothing but CONNACK may come first.
        deadline = time.monotonic() + self.connect_timeout
        publishes: list[Publish] = []
        others: list[tuple[int, bytes]] = []
        while not others:
            if time.monotonic() > deadline:
                raise TimeoutError("no CONNACK")
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionResetError("closed by the broker before CONNACK")
            publishes, others = reader.feed(chunk)
            if publishes:
                raise FrameError("PUBLISH before CONNACK")
        header, body = others[0]
        if header != CONNACK or len(body) != 2:
            raise FrameError(f"expected CONNACK, got packet type {header >> 4}")
        if body[1]:
            raise Refused(f"CONNACK {body[1]}: {CONNACK_REASONS.get(body[1], 'unknown reason')}")
        self.stats.sessions += 1
        sock.sendall(subscribe_packet(1, self.subscriptions))
        # Keepalive: the broker drops us after 1.5x keepalive of silence; ping at half of it. A broker that
        # answers nothing for a whole keepalive after a ping is gone.
        interval = max(1.0, self.keepalive / 2)
        sock.settimeout(min(1.0, interval))
        last_sent = time.monotonic()
        last_received = last_sent
        self._handle_others(others[1:], sock)
        recv = sock.recv
        size = self.recv_size
        feed = reader.feed
        deliver = self.on_publishes
        while not self._stop.is_set():
            try:
                chunk = recv(size)
            except TimeoutError:
                chunk = None
            now = time.monotonic()
            if chunk is not None:
                if not chunk:
                    if self._stop.is_set():
                        return True
                    raise ConnectionResetError("closed by the broker")
                last_received = now
                try:
                    publishes, others = feed(chunk)
                except FrameError as exc:  # what came before the bad bytes is still good
                    if exc.publishes:
                        deliver(exc.publishes)
                    raise
                if publishes:
                    deliver(publishes)
                    acks = [puback_packet(p[3]) for p in publishes if p[2]]
                    if acks:
                        sock.sendall(b"".join(acks))
                        last_sent = now
                if others:
                    self._handle_others(others, sock)
            if now - last_sent >= interval:
                sock.sendall(bytes([PINGREQ, 0]))
                last_sent = now
            if now - last_received > self.keepalive * 1.5 + 1:
                raise TimeoutError(f"nothing from the broker for {now - last_received:.0f} s")
        return True

    def _handle_others(self, others: list[tuple[int, bytes]], sock: socket.socket) -> None:
        for header, body in others:
            if header == SUBACK:
                granted = body[2:]
                if not granted or any(code == 0x80 for code in granted):
                    raise Refused(f"subscription refused (SUBACK {granted.hex()})")
                self._subscribed.set()
                log.info("%s subscribed: %s", self.username, ", ".join(f for f, _ in self.subscriptions))
            elif header == PINGRESP:
                continue
            else:
                raise FrameError(f"unexpected packet type {header >> 4} (first byte 0x{header:02x})")
