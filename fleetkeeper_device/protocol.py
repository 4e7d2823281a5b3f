"""The device protocol's messages: versioned JSON, encoded, decoded and validated here and nowhere else.

Every message is one JSON object ``{"v": 1, "type": ..., "id": ..., ...}``. This module holds one
specification per message type (``MESSAGES``); ``encode`` refuses to build a message that does not
match it, ``decode`` refuses to hand one over, and ``json_schema`` renders the same specification as
JSON Schema for docs/device-protocol.md, so the code and the document cannot drift apart.

Decoding is strict where strictness protects the device (types, sizes, patterns, duplicate keys,
NaN, nesting depth) and lenient where it keeps old devices working with a newer console: fields a
device does not know are kept and ignored, never an error.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import topics

PROTOCOL_VERSION = 1
# The broker disconnects a client that sends a packet over its max_packet_size (64 KiB by default in
# Fleetkeeper); a message must fit with the topic and MQTT headers to spare.
MAX_MESSAGE_BYTES = 48 * 1024
MAX_NESTING = 8

ID_PATTERN = r"^[A-Za-z0-9._:-]{1,64}$"
NAME_PATTERN = r"^[a-z][a-z0-9_]{0,31}$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
# Base64 of a 64-byte Ed25519 signature, standard alphabet with padding.
SIGNATURE_PATTERN = r"^[A-Za-z0-9+/]{86}==$"
MAX_TELEMETRY_VALUES = 32

ACK_STATUSES = ("ok", "rejected", "failed", "expired")
KEY_TYPES = ("ec-p256", "ed25519")


class ProtocolError(ValueError):
    """A message that is not valid protocol. ``path`` says where (``values.temperature``), the text what
    is wrong with it; ``message_id``/``message_type`` are filled when the broken message still had them,
    so a device can answer with a ``rejected`` ack."""

    def __init__(self, reason: str, *, path: str = "", message_type: str | None = None, message_id: str | None = None):
        self.reason = reason
        self.path = path
        self.message_type = message_type
        self.message_id = message_id
        super().__init__(f"{path}: {reason}" if path else reason)


@dataclass(frozen=True)
class Field:
    name: str
    kind: str  # string | integer | number | boolean | object | values
    required: bool = True
    description: str = ""
    pattern: str | None = None
    enum: tuple[str, ...] | None = None
    min_length: int | None = None
    max_length: int | None = None
    minimum: float | None = None
    maximum: float | None = None
    prefix: str | None = None  # a string field must start with this (PEM blocks)


@dataclass(frozen=True)
class MessageSpec:
    type: str
    channel: str
    direction: str  # "device" (device -> console) or "console" (console -> device)
    description: str
    fields: tuple[Field, ...]
    example: dict = field(default_factory=dict)

    @property
    def field_names(self) -> frozenset[str]:
        return frozenset(f.name for f in self.fields)


_ID = Field("id", "string", pattern=ID_PATTERN, description="Unique per message of this type and device.")
_TS = Field("ts", "number", minimum=0, description="Sender's clock, Unix seconds.")
_TS_OPTIONAL = Field("ts", "number", required=False, minimum=0, description="Sender's clock, Unix seconds.")
_EXPIRES = Field(
    "expires",
    "number",
    required=False,
    minimum=0,
    description="Unix seconds; a device that receives the message later answers `expired` and does nothing.",
)
_PEM_CERTIFICATE = "-----BEGIN CERTIFICATE-----"

MESSAGES: dict[str, MessageSpec] = {}


def _register(spec: MessageSpec) -> None:
    MESSAGES[spec.type] = spec


_register(
    MessageSpec(
        type="telemetry",
        channel=topics.TELEMETRY,
        direction="device",
        description="Measurements. Sent at the device's own rhythm, QoS 0.",
        fields=(
            _ID,
            _TS,
            Field("seq", "integer", minimum=0, description="Per-boot counter, +1 per telemetry message."),
            Field(
                "values",
                "values",
                description=f"Up to {MAX_TELEMETRY_VALUES} named readings: numbers, booleans or null.",
            ),
        ),
        example={
            "v": 1,
            "type": "telemetry",
            "id": "b7d0c1f2-17",
            "ts": 1763788800.25,
            "seq": 17,
            "values": {"temperature": 21.4, "battery": 87, "signal": -67},
        },
    )
)
_register(
    MessageSpec(
        type="status",
        channel=topics.STATUS,
        direction="device",
        description="What the device runs. Sent after every connect and on the `publish_status` command, QoS 1.",
        fields=(
            _ID,
            _TS,
            Field("firmware", "string", min_length=1, max_length=64, description="Running firmware version."),
            Field("boot_time", "number", minimum=0, description="When the device booted, Unix seconds."),
            Field("uptime", "number", minimum=0, description="Seconds since boot."),
            Field("model", "string", required=False, max_length=100, description="Product model, if known."),
            Field(
                "certificate_serial",
                "string",
                required=False,
                pattern=r"^[0-9a-f]{1,64}$",
                description="Serial (hex) of the installed client certificate, if any.",
            ),
            Field(
                "credential_id",
                "string",
                required=False,
                max_length=100,
                description="The console's id of the secret this connection logged in with (`rot-<n>` after a "
                "rotation), if it has one.",
            ),
            Field(
                "fallback",
                "boolean",
                required=False,
                description="True when the broker refused the newest secret and this connection logged in with the "
                "previous one (docs/rotation.md: the console alerts when that happens after its switch).",
            ),
            Field(
                "refused_credential_id",
                "string",
                required=False,
                max_length=100,
                description="With `fallback`: the id of the newest secret, the one the broker refused.",
            ),
        ),
        example={
            "v": 1,
            "type": "status",
            "id": "b7d0c1f2-s1",
            "ts": 1763788800.0,
            "firmware": "2.4.1",
            "boot_time": 1763785200.0,
            "uptime": 3600.0,
        },
    )
)
_register(
    MessageSpec(
        type="ack",
        channel=topics.ACK,
        direction="device",
        description=(
            "The answer to one console message, sent exactly once per message id, QoS 1. "
            "`id` is the id of the message being answered."
        ),
        fields=(
            _ID,
            _TS,
            Field("command", "string", pattern=NAME_PATTERN, description="Type of the answered message."),
            Field(
                "status",
                "string",
                enum=ACK_STATUSES,
                description="ok, rejected (will not), failed (could not), expired (too late).",
            ),
            Field("detail", "string", required=False, max_length=500, description="Why, for people."),
            Field("result", "object", required=False, description="Handler output, if any."),
        ),
        example={
            "v": 1,
            "type": "ack",
            "id": "cmd-42",
            "ts": 1763788801.5,
            "command": "credentials",
            "status": "ok",
        },
    )
)
_register(
    MessageSpec(
        type="csr",
        channel=topics.CSR,
        direction="device",
        description="A certificate signing request made on the device, answering `certificate_renew`, QoS 1.",
        fields=(
            _ID,
            _TS,
            Field("ref", "string", pattern=ID_PATTERN, description="Id of the `certificate_renew` message."),
            Field(
                "csr",
                "string",
                max_length=8192,
                prefix="-----BEGIN CERTIFICATE REQUEST-----",
                description="PEM; subject CN is the client id. The private key never leaves the device.",
            ),
        ),
        example={
            "v": 1,
            "type": "csr",
            "id": "csr-cmd-43",
            "ts": 1763788802.0,
            "ref": "cmd-43",
            "csr": "-----BEGIN CERTIFICATE REQUEST-----\nMIIB...\n-----END CERTIFICATE REQUEST-----\n",
        },
    )
)
_register(
    MessageSpec(
        type="command",
        channel=topics.COMMAND,
        direction="console",
        description="Do something. Built in: `ping`, `publish_status`; others are the device application's.",
        fields=(
            _ID,
            _TS_OPTIONAL,
            _EXPIRES,
            Field("name", "string", pattern=NAME_PATTERN, description="What to do."),
            Field("args", "object", required=False, description="Arguments for the command."),
        ),
        example={"v": 1, "type": "command", "id": "cmd-41", "ts": 1763788800.0, "name": "ping"},
    )
)
_register(
    MessageSpec(
        type="config",
        channel=topics.CONFIG,
        direction="console",
        description="New configuration for the device application.",
        fields=(
            _ID,
            _TS_OPTIONAL,
            _EXPIRES,
            Field("config", "object", description="The settings; their meaning belongs to the application."),
            Field(
                "revision",
                "integer",
                required=False,
                minimum=0,
                description="Increases with every change; a device refuses a revision older than the one it runs.",
            ),
        ),
        example={
            "v": 1,
            "type": "config",
            "id": "cfg-7",
            "revision": 7,
            "config": {"telemetry_interval": 30},
        },
    )
)
_register(
    MessageSpec(
        type="credentials",
        channel=topics.CREDENTIALS,
        direction="console",
        description=(
            "A new broker secret (rotation). The device stores it, keeps the previous one, and acks; "
            "the console then switches the broker over."
        ),
        fields=(
            _ID,
            _TS_OPTIONAL,
            _EXPIRES,
            Field("secret", "string", min_length=16, max_length=256, description="The new MQTT password."),
            Field(
                "credential_id",
                "string",
                required=False,
                pattern=ID_PATTERN,
                description="The console's name for this credential, echoed in nothing but useful in logs.",
            ),
        ),
        example={
            "v": 1,
            "type": "credentials",
            "id": "rot-9",
            "ts": 1763788800.0,
            "secret": "kq3v...43 characters of base64url...",
            "credential_id": "cred-1201",
        },
    )
)
_register(
    MessageSpec(
        type="certificate_renew",
        channel=topics.CREDENTIALS,
        direction="console",
        description="Make a new key pair on the device and send a CSR on `tx/<id>/csr`.",
        fields=(
            _ID,
            _TS_OPTIONAL,
            _EXPIRES,
            Field("key_type", "string", required=False, enum=KEY_TYPES, description="Default ec-p256."),
        ),
        example={"v": 1, "type": "certificate_renew", "id": "cmd-43", "key_type": "ec-p256"},
    )
)
_register(
    MessageSpec(
        type="certificate",
        channel=topics.CREDENTIALS,
        direction="console",
        description=(
            "The signed certificate for the device's last CSR. The device checks it matches its key, then installs it."
        ),
        fields=(
            _ID,
            _TS_OPTIONAL,
            _EXPIRES,
            Field("ref", "string", pattern=ID_PATTERN, description="Id of the `certificate_renew` it answers."),
            Field("certificate", "string", max_length=16384, prefix=_PEM_CERTIFICATE, description="PEM."),
            Field(
                "chain",
                "string",
                required=False,
                max_length=32768,
                prefix=_PEM_CERTIFICATE,
                description="PEM, issuing CA first.",
            ),
        ),
        example={
            "v": 1,
            "type": "certificate",
            "id": "cert-43",
            "ref": "cmd-43",
            "certificate": "-----BEGIN CERTIFICATE-----\nMIIB...\n-----END CERTIFICATE-----\n",
        },
    )
)
_register(
    MessageSpec(
        type="firmware_offer",
        channel=topics.FIRMWARE,
        direction="console",
        description=(
            "A firmware image the device may install. `signature` is Ed25519 over the 32 raw bytes of the "
            "image's SHA-256; the device verifies it with its configured public key before accepting."
        ),
        fields=(
            _ID,
            _TS_OPTIONAL,
            _EXPIRES,
            Field("version", "string", min_length=1, max_length=64, description="Version of the offered image."),
            Field("url", "string", min_length=1, max_length=2048, description="Where to download the image."),
            Field("size", "integer", minimum=0, description="Image size in bytes."),
            Field("sha256", "string", pattern=SHA256_PATTERN, description="SHA-256 of the image, lower-case hex."),
            Field("signature", "string", pattern=SIGNATURE_PATTERN, description="Base64 Ed25519 signature."),
            Field("key_id", "string", required=False, pattern=ID_PATTERN, description="Which signing key."),
        ),
        example={
            "v": 1,
            "type": "firmware_offer",
            "id": "fw-3",
            "version": "2.5.0",
            "url": "https://firmware.example.com/sensor-2.5.0.bin",
            "size": 524288,
            "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
            "signature": "A" * 86 + "==",
        },
    )
)

DEVICE_MESSAGE_TYPES = tuple(t for t, s in MESSAGES.items() if s.direction == "device")
CONSOLE_MESSAGE_TYPES = tuple(t for t, s in MESSAGES.items() if s.direction == "console")
CHANNEL_TYPES: dict[str, tuple[str, ...]] = {}
for _spec in MESSAGES.values():
    CHANNEL_TYPES[_spec.channel] = (*CHANNEL_TYPES.get(_spec.channel, ()), _spec.type)

_VALUE_NAME_RE = re.compile(NAME_PATTERN)
_compiled: dict[str, re.Pattern[str]] = {}


def _regex(pattern: str) -> re.Pattern[str]:
    compiled = _compiled.get(pattern)
    if compiled is None:
        compiled = _compiled[pattern] = re.compile(pattern)
    return compiled


def is_name(value: str) -> bool:
    """A command, reading or message-type name: lower-case letters, digits, underscores."""
    return bool(_VALUE_NAME_RE.match(value))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _depth(value: Any, level: int = 0) -> int:
    if level > MAX_NESTING:
        return level
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level + 1)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level + 1)
    return level


def _check_field(spec: Field, value: Any) -> None:
    name = spec.name
    if spec.kind == "string":
        if not isinstance(value, str):
            raise ProtocolError(f"must be a string, got {type(value).__name__}", path=name)
        if spec.min_length is not None and len(value) < spec.min_length:
            raise ProtocolError(f"must be at least {spec.min_length} characters", path=name)
        if spec.max_length is not None and len(value) > spec.max_length:
            raise ProtocolError(f"must be at most {spec.max_length} characters, got {len(value)}", path=name)
        if spec.pattern and not _regex(spec.pattern).match(value):
            shown = value if len(value) <= 40 else value[:37] + "..."
            raise ProtocolError(f"{shown!r} does not match {spec.pattern}", path=name)
        if spec.enum and value not in spec.enum:
            raise ProtocolError(f"{value!r} is not one of {', '.join(spec.enum)}", path=name)
        if spec.prefix and not value.startswith(spec.prefix):
            raise ProtocolError(f"must start with {spec.prefix!r}", path=name)
    elif spec.kind in ("integer", "number"):
        if spec.kind == "integer":
            if not isinstance(value, int) or isinstance(value, bool):
                raise ProtocolError(f"must be an integer, got {type(value).__name__}", path=name)
        elif not _is_number(value):
            raise ProtocolError(f"must be a finite number, got {value!r}", path=name)
        if spec.minimum is not None and value < spec.minimum:
            raise ProtocolError(f"must be >= {spec.minimum}, got {value}", path=name)
        if spec.maximum is not None and value > spec.maximum:
            raise ProtocolError(f"must be <= {spec.maximum}, got {value}", path=name)
    elif spec.kind == "boolean":
        if not isinstance(value, bool):
            raise ProtocolError("must be true or false", path=name)
    elif spec.kind == "object":
        if not isinstance(value, dict):
            raise ProtocolError(f"must be a JSON object, got {type(value).__name__}", path=name)
        if _depth(value) > MAX_NESTING:
            raise ProtocolError(f"nests deeper than {MAX_NESTING} levels", path=name)
    elif spec.kind == "values":
        if not isinstance(value, dict):
            raise ProtocolError(f"must be a JSON object, got {type(value).__name__}", path=name)
        if len(value) > MAX_TELEMETRY_VALUES:
            raise ProtocolError(f"has {len(value)} readings; at most {MAX_TELEMETRY_VALUES}", path=name)
        for key, reading in value.items():
            if not _VALUE_NAME_RE.match(key):
                raise ProtocolError(f"reading name {key!r} does not match {NAME_PATTERN}", path=name)
            if reading is not None and not isinstance(reading, bool) and not _is_number(reading):
                raise ProtocolError(
                    f"must be a finite number, true/false or null, got {reading!r}", path=f"{name}.{key}"
                )
    else:  # pragma: no cover - a programming error in MESSAGES
        raise AssertionError(f"unknown field kind {spec.kind}")


def validate(message: Mapping[str, Any], *, channel: str | None = None) -> dict[str, Any]:
    """Check a decoded message against its specification; returns it as a dict. Raises ProtocolError."""
    if not isinstance(message, Mapping):
        raise ProtocolError(f"a message must be a JSON object, got {type(message).__name__}")
    raw_type = message.get("type")
    raw_id = message.get("id")
    message_type = raw_type if isinstance(raw_type, str) and raw_type in MESSAGES else None
    message_id = raw_id if isinstance(raw_id, str) and _regex(ID_PATTERN).match(raw_id) else None

    def fail(reason: str, path: str = "") -> ProtocolError:
        return ProtocolError(reason, path=path, message_type=message_type, message_id=message_id)

    version = message.get("v")
    if version != PROTOCOL_VERSION or isinstance(version, bool):
        if "v" not in message:
            raise fail("missing protocol version; expected 1", "v")
        raise fail(f"unsupported protocol version {version!r}; this library speaks version {PROTOCOL_VERSION}", "v")
    if not isinstance(raw_type, str):
        raise fail("missing message type", "type")
    if message_type is None:
        raise fail(f"unknown message type {raw_type!r}; known: {', '.join(MESSAGES)}", "type")
    spec = MESSAGES[message_type]
    if channel is not None and channel != spec.channel:
        raise fail(f"{message_type!r} messages belong on the {spec.channel!r} channel, not {channel!r}", "type")
    for field_spec in spec.fields:
        if field_spec.name not in message or message[field_spec.name] is None:
            if field_spec.required:
                raise fail(f"required field missing ({field_spec.description or field_spec.kind})", field_spec.name)
            continue
        try:
            _check_field(field_spec, message[field_spec.name])
        except ProtocolError as exc:
            raise fail(exc.reason, exc.path) from None
    return dict(message)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def decode(payload: bytes | bytearray | str, *, channel: str | None = None) -> dict[str, Any]:
    """Parse and validate one message. ``channel`` (e.g. ``"command"``) also checks the type belongs there."""
    size = len(payload.encode() if isinstance(payload, str) else payload)
    if size > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message is {size} bytes; the limit is {MAX_MESSAGE_BYTES}")
    try:
        text = payload.decode("utf-8") if isinstance(payload, bytes | bytearray) else payload
        message = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicate_keys)
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"payload is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except RecursionError:
        raise ProtocolError("payload nests too deeply") from None
    except ValueError as exc:
        raise ProtocolError(f"payload is not valid JSON: {exc}") from None
    return validate(message, channel=channel)


def encode(message_type: str, **fields: Any) -> bytes:
    """Build, validate and serialise one message: ``encode("ack", id="cmd-1", ts=..., command="ping", status="ok")``.

    Fields given as None are left out. Raises ProtocolError before anything is sent."""
    message = {"v": PROTOCOL_VERSION, "type": message_type}
    message.update((k, v) for k, v in fields.items() if v is not None)
    validate(message)
    payload = json.dumps(message, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    if len(payload) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message is {len(payload)} bytes; the limit is {MAX_MESSAGE_BYTES}")
    return payload


def encode_telemetry(*, message_id: str, ts: float, seq: int, values: Mapping[str, Any]) -> bytes:
    """The hot path of a busy device: the same checks as ``encode("telemetry", ...)``, fewer steps."""
    for key, reading in values.items():
        if not _VALUE_NAME_RE.match(key):
            raise ProtocolError(f"reading name {key!r} does not match {NAME_PATTERN}", path="values")
        if reading is not None and not isinstance(reading, bool) and not _is_number(reading):
            raise ProtocolError(f"must be a finite number, true/false or null, got {reading!r}", path=f"values.{key}")
    if len(values) > MAX_TELEMETRY_VALUES:
        raise ProtocolError(f"has {len(values)} readings; at most {MAX_TELEMETRY_VALUES}", path="values")
    if not _regex(ID_PATTERN).match(message_id):
        raise ProtocolError(f"{message_id!r} does not match {ID_PATTERN}", path="id")
    return json.dumps(
        {"v": PROTOCOL_VERSION, "type": "telemetry", "id": message_id, "ts": ts, "seq": seq, "values": dict(values)},
        separators=(",", ":"),
        allow_nan=False,
    ).encode()


def json_schema(message_type: str) -> dict[str, Any]:
    """The JSON Schema (2020-12) of one message type, generated from the same specification ``validate`` uses."""
    spec = MESSAGES[message_type]
    properties: dict[str, Any] = {
        "v": {"const": PROTOCOL_VERSION, "description": "Protocol version."},
        "type": {"const": spec.type},
    }
    required = ["v", "type"]
    for f in spec.fields:
        prop: dict[str, Any]
        if f.kind == "values":
            prop = {
                "type": "object",
                "maxProperties": MAX_TELEMETRY_VALUES,
                "propertyNames": {"pattern": NAME_PATTERN},
                "additionalProperties": {"type": ["number", "boolean", "null"]},
            }
        else:
            prop = {"type": f.kind}
        if f.pattern:
            prop["pattern"] = f.pattern
        if f.enum:
            prop["enum"] = list(f.enum)
        if f.min_length is not None:
            prop["minLength"] = f.min_length
        if f.max_length is not None:
            prop["maxLength"] = f.max_length
        if f.minimum is not None:
            prop["minimum"] = f.minimum
        if f.maximum is not None:
            prop["maximum"] = f.maximum
        if f.prefix:
            # PEM markers hold only letters, spaces and '-', which are literal in every regex dialect.
            prop["pattern"] = "^" + f.prefix
        if f.description:
            prop["description"] = f.description
        properties[f.name] = prop
        if f.required:
            required.append(f.name)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"{spec.type} ({'device to console' if spec.direction == 'device' else 'console to device'})",
        "type": "object",
        "required": required,
        "properties": properties,
        "additionalProperties": True,
    }
