"""Payload encryption: the sealed envelope, implemented once for the device and the console.

A sealed message is the protocol's JSON message encrypted and authenticated with the device's 256-bit payload key
(ChaCha20-Poly1305). The associated data binds it to the full MQTT topic and the client id, so a message moved to
another device's topic, or another channel, does not open. A per-device counter in the nonce makes every nonce
unique under a key and lets the receiver refuse replays (a sliding window of WINDOW counters tolerates reordering,
for example across consumer replicas on a shared subscription). Layout (docs/device-protocol.md, "Payload
encryption"), all integers big-endian::

    0   1  marker 0xF5 (a byte no UTF-8 text, so no JSON message, starts with)
    1   1  envelope version (1: ChaCha20-Poly1305, 12-byte nonce, 16-byte tag)
    2   8  key id: SHA-256("fleetkeeper payload key id" 0x00 key)[:8]
    10  1  direction: 1 device -> console (tx/...), 2 console -> device (rx/...)
    11  8  counter (unsigned, never reused under one key and direction)
    19  4  SHA-256(topic)[:4]      diagnostic hints: let the receiver say "wrong topic" or "wrong client id"
    23  4  SHA-256(client id)[:4]  instead of only "does not authenticate"; authenticated like the rest
    27  .. ciphertext, then the 16-byte Poly1305 tag

    nonce = direction (1 byte) || 3 zero bytes || counter (8 bytes)
    associated data = header (27 bytes) || u16 len || topic (UTF-8) || u16 len || client id (UTF-8)

No Django here: the simulator, firmware teams and the console's consumer all import this module.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from .credentials import write_private_json

MARKER = 0xF5
MARKER_BYTE = b"\xf5"
VERSION = 1
KEY_BYTES = 32
KEY_ID_BYTES = 8
TAG_BYTES = 16
HEADER = struct.Struct("!BB8sBQ4s4s")
HEADER_BYTES = HEADER.size  # 27
OVERHEAD = HEADER_BYTES + TAG_BYTES  # 43 bytes added to every message
DEVICE_TO_CONSOLE = 1
CONSOLE_TO_DEVICE = 2
DIRECTIONS = {DEVICE_TO_CONSOLE: "device to console", CONSOLE_TO_DEVICE: "console to device"}
MAX_COUNTER = 2**64 - 1
WINDOW = 1024  # counters this far below the highest seen are still accepted once (reordering)
KEY_TEXT_PREFIX = "fkpk1."
_KEY_ID_LABEL = b"fleetkeeper payload key id\x00"


# --- errors: one class per way a sealed message fails, each with a stable ``code`` ------------------------------
class SealingError(ValueError):
    """A sealed message that was not accepted. ``code`` is stable (counted, shown in alert evidence)."""

    code = "sealing_error"

    def __init__(self, message: str, *, counter: int | None = None, key_id: str | None = None):
        super().__init__(message)
        self.counter = counter
        self.key_id = key_id


class MalformedEnvelope(SealingError):
    """Not a sealed envelope this library can read: too short, wrong marker, unknown version or direction."""

    code = "malformed"


class UnknownKey(SealingError):
    """The receiver has no payload key for this device (none issued, or not loaded yet)."""

    code = "unknown_key"


class WrongKey(SealingError):
    """Sealed with a key other than the one the receiver holds for this device (an old key, or another device's)."""

    code = "wrong_key"


class WrongDirection(SealingError):
    """A console-to-device message offered to the console, or the reverse (a reflected message)."""

    code = "wrong_direction"


class WrongTopic(SealingError):
    """Authentic for another topic: moved to another device's topic or another channel."""

    code = "wrong_topic"


class WrongClient(SealingError):
    """Authentic for another client id."""

    code = "wrong_client"


class Tampered(SealingError):
    """The tag does not verify: the ciphertext or the header was changed in transit (or the key is forged)."""

    code = "tampered"


class Replayed(SealingError):
    """This counter was accepted before: the same sealed message again."""

    code = "replayed"


class StaleCounter(Replayed):
    """The counter is older than the replay window: it went backwards, beyond any reordering."""

    code = "stale"


# --- keys -------------------------------------------------------------------------------------------------------
def generate_key() -> bytes:
    return os.urandom(KEY_BYTES)


def key_id(key: bytes) -> bytes:
    """Derived from the key, so a device needs only the key; reveals nothing usable about it."""
    return hashlib.sha256(_KEY_ID_LABEL + key).digest()[:KEY_ID_BYTES]


def encode_key(key: bytes) -> str:
    """The text an operator copies into the device: ``fkpk1.`` + unpadded base64url of the 32 bytes."""
    if len(key) != KEY_BYTES:
        raise ValueError(f"a payload key is {KEY_BYTES} bytes, not {len(key)}")
    return KEY_TEXT_PREFIX + base64.urlsafe_b64encode(key).rstrip(b"=").decode()


def decode_key(value: str | bytes) -> bytes:
    """``fkpk1.<base64url>`` (as shown by the console) or the raw 32 bytes."""
    if isinstance(value, bytes | bytearray):
        if len(value) == KEY_BYTES:
            return bytes(value)
        value = bytes(value).decode("ascii", errors="replace")
    text = value.strip()
    if not text.startswith(KEY_TEXT_PREFIX):
        raise ValueError(f"a payload key starts with {KEY_TEXT_PREFIX!r}; copy the whole value the console showed")
    body = text[len(KEY_TEXT_PREFIX) :]
    try:
        key = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except ValueError as exc:
        raise ValueError("the payload key is not valid base64url; copy it again from the console") from exc
    if len(key) != KEY_BYTES:
        raise ValueError(f"the payload key decodes to {len(key)} bytes, not {KEY_BYTES}; copy it again")
    return key


def _hint(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()[:4]


def _text(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


def is_sealed(payload: bytes) -> bool:
    return payload[:1] == MARKER_BYTE


@dataclass(frozen=True, slots=True)
class Header:
    key_id: bytes
    direction: int
    counter: int
    topic_hint: bytes
    client_hint: bytes

    @property
    def key_id_hex(self) -> str:
        return self.key_id.hex()


def peek(envelope: bytes) -> Header:
    """The envelope's clear header (nothing in it is trusted until ``PayloadKey.open`` verified the tag)."""
    if len(envelope) < OVERHEAD:
        raise MalformedEnvelope(f"truncated: {len(envelope)} bytes, a sealed message has at least {OVERHEAD}")
    marker, version, kid, direction, counter, topic_hint, client_hint = HEADER.unpack_from(envelope)
    if marker != MARKER:
        raise MalformedEnvelope(f"not a sealed message (first byte 0x{marker:02x}, expected 0x{MARKER:02x})")
    if version != VERSION:
        raise MalformedEnvelope(f"envelope version {version} is not supported (this library reads {VERSION})")
    if direction not in DIRECTIONS:
        raise MalformedEnvelope(f"unknown direction {direction}")
    return Header(kid, direction, counter, topic_hint, client_hint)


class Opened(NamedTuple):
    plaintext: bytes
    counter: int
    key_id: bytes


class PayloadKey:
    """One device's payload key: seals and opens envelopes (replay checks are the caller's: ``ReplayWindow``)."""

    __slots__ = ("_aead", "key_id", "key_id_hex")

    def __init__(self, key: bytes | str):
        raw = decode_key(key) if isinstance(key, str) else bytes(key)
        if len(raw) != KEY_BYTES:
            raise ValueError(f"a payload key is {KEY_BYTES} bytes, not {len(raw)}")
        self._aead = ChaCha20Poly1305(raw)
        self.key_id = key_id(raw)
        self.key_id_hex = self.key_id.hex()

    def __repr__(self) -> str:
        return f"PayloadKey(key_id={self.key_id_hex})"

    def seal(
        self, plaintext: bytes, *, topic: str | bytes, client_id: str | bytes, counter: int, direction: int
    ) -> bytes:
        if not 0 < counter <= MAX_COUNTER:
            raise ValueError("the counter must be between 1 and 2**64 - 1")
        if direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {direction}")
        topic_b, client_b = _text(topic), _text(client_id)
        header = HEADER.pack(MARKER, VERSION, self.key_id, direction, counter, _hint(topic_b), _hint(client_b))
        nonce = bytes([direction, 0, 0, 0]) + counter.to_bytes(8, "big")
        return header + self._aead.encrypt(nonce, plaintext, _associated(header, topic_b, client_b))

    def open(self, envelope: bytes, *, topic: str | bytes, client_id: str | bytes, direction: int) -> Opened:
        """Verify and decrypt; raises the SealingError subclass that says what is wrong (no replay check).
        The consumer calls this once per sealed message: the good path slices and decrypts, nothing more."""
        if (
            len(envelope) < OVERHEAD
            or envelope[0] != MARKER
            or envelope[1] != VERSION
            or envelope[2:10] != self.key_id
            or envelope[10] != direction
        ):
            self._refuse(envelope, direction)
        topic_b = topic if type(topic) is bytes else _text(topic)
        client_b = client_id if type(client_id) is bytes else _text(client_id)
        associated = b"".join(
            (
                envelope[:HEADER_BYTES],
                len(topic_b).to_bytes(2, "big"),
                topic_b,
                len(client_b).to_bytes(2, "big"),
                client_b,
            )
        )
        try:
            plaintext = self._aead.decrypt(
                envelope[10:11] + b"\x00\x00\x00" + envelope[11:19], envelope[HEADER_BYTES:], associated
            )
        except InvalidTag:
            self._diagnose(envelope, topic_b, client_b)
        return Opened(plaintext, int.from_bytes(envelope[11:19], "big"), self.key_id)

    def _refuse(self, envelope: bytes, direction: int) -> None:
        header = peek(envelope)  # raises MalformedEnvelope
        if header.key_id != self.key_id:
            raise WrongKey(
                f"sealed with key id {header.key_id_hex}; this device's payload key is {self.key_id_hex}",
                counter=header.counter,
                key_id=header.key_id_hex,
            )
        raise WrongDirection(
            f"sealed {DIRECTIONS[header.direction]}, received {DIRECTIONS[direction]}",
            counter=header.counter,
            key_id=header.key_id_hex,
        )

    @staticmethod
    def _diagnose(envelope: bytes, topic: bytes, client_id: bytes) -> None:
        # Only now (off the good path) tell the likely cause apart; the hints are authenticated, so a header that
        # names another topic and verified there was really sealed for it.
        header = peek(envelope)
        if header.topic_hint != _hint(topic):
            raise WrongTopic(
                f"sealed for another topic, not {topic.decode(errors='replace')!r} (moved or misrouted)",
                counter=header.counter,
                key_id=header.key_id_hex,
            )
        if header.client_hint != _hint(client_id):
            raise WrongClient(
                f"sealed for another client id, not {client_id.decode(errors='replace')!r}",
                counter=header.counter,
                key_id=header.key_id_hex,
            )
        raise Tampered(
            "does not authenticate: changed in transit, or not sealed with this device's key",
            counter=header.counter,
            key_id=header.key_id_hex,
        )


def _associated(header: bytes, topic: bytes, client_id: bytes) -> bytes:
    return b"".join((header, len(topic).to_bytes(2, "big"), topic, len(client_id).to_bytes(2, "big"), client_id))


# --- replay protection ------------------------------------------------------------------------------------------
class ReplayWindow:
    """The highest counter accepted and which of the WINDOW counters below it were (RFC 4303's anti-replay
    window). ``check`` only looks; ``accept`` looks and remembers. The console's Redis script
    (security/detection/payloads.py) applies the same rule so every consumer replica shares one window."""

    __slots__ = ("bits", "highest", "size")

    def __init__(self, highest: int = 0, *, size: int = WINDOW):
        self.highest = highest
        self.size = size
        # bit i set: counter (highest - i) was accepted. Restored from the highest alone (after a reboot), every
        # counter at or below it is taken as seen: refusing an old message is safe, accepting a replay is not.
        self.bits = (1 << size) - 1 if highest else 0

    def check(self, counter: int) -> None:
        if counter > self.highest:
            return
        behind = self.highest - counter
        if behind >= self.size:
            raise StaleCounter(
                f"counter {counter} is older than the replay window (highest accepted {self.highest}, window "
                f"{self.size}): the counter went backwards",
                counter=counter,
            )
        if (self.bits >> behind) & 1:
            raise Replayed(f"counter {counter} was accepted before: a replayed message", counter=counter)

    def accept(self, counter: int) -> None:
        self.check(counter)
        if counter > self.highest:
            shift = counter - self.highest
            self.bits = ((self.bits << shift) | 1) & ((1 << self.size) - 1) if shift < self.size else 1
            self.highest = counter
        else:
            self.bits |= 1 << (self.highest - counter)


# --- counters that survive a reboot -----------------------------------------------------------------------------
@dataclass(frozen=True)
class CounterState:
    sent_reserved: int = 0  # the highest send counter reserved (persisted before any counter up to it is used)
    received_highest: int = 0  # the highest console-to-device counter accepted


class CounterStore(Protocol):
    def load(self) -> CounterState: ...

    def save(self, state: CounterState) -> None:
        """Must be durable when it returns: a counter is used only after its reservation is saved."""


class MemoryCounterStore:
    def __init__(self, state: CounterState | None = None):
        self._state = state or CounterState()
        self._lock = threading.Lock()

    def load(self) -> CounterState:
        with self._lock:
            return self._state

    def save(self, state: CounterState) -> None:
        with self._lock:
            self._state = state


class FileCounterStore:
    """One small JSON file next to the credentials, replaced atomically (temporary file, fsync, rename)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._lock = threading.Lock()

    def load(self) -> CounterState:
        with self._lock:
            try:
                data = json.loads(self.path.read_text())
            except FileNotFoundError:
                return CounterState()
            return CounterState(int(data.get("sent_reserved", 0)), int(data.get("received_highest", 0)))

    def save(self, state: CounterState) -> None:
        with self._lock:
            write_private_json(
                self.path, {"sent_reserved": state.sent_reserved, "received_highest": state.received_highest}
            )


class DeviceSealer:
    """The device half: seals what the device publishes, opens what the console sends.

    Counters are reserved in blocks of ``reserve``: the store is written once per block, before any counter of the
    block is used, so a device that reboots (or loses power mid-block) starts after the last reservation and never
    reuses a nonce; it skips at most ``reserve - 1`` counters, which the receiver's window does not mind."""

    def __init__(self, key: bytes | str | PayloadKey, client_id: str, *, counters=None, reserve: int = 1000):
        self.key = key if isinstance(key, PayloadKey) else PayloadKey(key)
        self.client_id = client_id
        self.counters: CounterStore = counters if counters is not None else MemoryCounterStore()
        self.reserve = max(1, reserve)
        state = self.counters.load()
        self._next = state.sent_reserved + 1
        self._reserved = state.sent_reserved
        self._received = ReplayWindow(state.received_highest)
        self._lock = threading.Lock()

    def seal(self, topic: str, plaintext: bytes) -> bytes:
        with self._lock:
            counter = self._next
            if counter > self._reserved:
                self._reserved = counter + self.reserve - 1
                state = self.counters.load()
                self.counters.save(CounterState(self._reserved, state.received_highest))
            self._next = counter + 1
        return self.key.seal(
            plaintext, topic=topic, client_id=self.client_id, counter=counter, direction=DEVICE_TO_CONSOLE
        )

    def open(self, topic: str, envelope: bytes) -> bytes:
        """A console-to-device envelope -> plaintext; raises SealingError (Replayed included)."""
        opened = self.key.open(envelope, topic=topic, client_id=self.client_id, direction=CONSOLE_TO_DEVICE)
        with self._lock:
            self._received.accept(opened.counter)
            state = self.counters.load()
            if opened.counter > state.received_highest:
                self.counters.save(CounterState(state.sent_reserved, opened.counter))
        return opened.plaintext
