"""The protocol module: every message type round-trips, broken messages fail with errors that say what is wrong,
and the JSON Schema published for firmware teams agrees with the validator."""

import json

import jsonschema
import pytest

from fleetkeeper_device import protocol
from fleetkeeper_device.protocol import MESSAGES, ProtocolError, decode, encode, encode_telemetry, json_schema


@pytest.mark.parametrize("message_type", sorted(MESSAGES))
def test_every_documented_example_is_a_valid_message_on_its_channel(message_type):
    spec = MESSAGES[message_type]
    message = decode(json.dumps(spec.example), channel=spec.channel)
    assert message["type"] == message_type
    jsonschema.validate(spec.example, json_schema(message_type))


@pytest.mark.parametrize("message_type", sorted(MESSAGES))
def test_encode_then_decode_gives_the_same_message(message_type):
    example = dict(MESSAGES[message_type].example)
    fields = {k: v for k, v in example.items() if k not in ("v", "type")}
    payload = encode(message_type, **fields)
    assert decode(payload) == example


def test_encode_leaves_out_fields_given_as_none():
    payload = encode("ack", id="cmd-1", ts=1.0, command="command", status="ok", detail=None, result=None)
    assert json.loads(payload) == {
        "v": 1,
        "type": "ack",
        "id": "cmd-1",
        "ts": 1.0,
        "command": "command",
        "status": "ok",
    }


def test_telemetry_fast_path_produces_what_the_validator_accepts():
    payload = encode_telemetry(message_id="abc-1", ts=12.5, seq=3, values={"temperature": 21.5, "door_open": False})
    assert decode(payload, channel="telemetry")["values"] == {"temperature": 21.5, "door_open": False}


@pytest.mark.parametrize(
    "values, path",
    [
        ({"temperature": "hot"}, "values.temperature"),
        ({"temperature": float("nan")}, "values.temperature"),
        ({"Temperature": 1}, "values"),
        ({f"r{i}": i for i in range(40)}, "values"),
    ],
)
def test_telemetry_fast_path_refuses_what_the_validator_refuses(values, path):
    with pytest.raises(ProtocolError) as fast:
        encode_telemetry(message_id="abc-1", ts=1.0, seq=1, values=values)
    with pytest.raises(ProtocolError) as slow:
        encode("telemetry", id="abc-1", ts=1.0, seq=1, values=values)
    assert fast.value.path == slow.value.path == path


BASE_COMMAND = {"v": 1, "type": "command", "id": "cmd-9", "name": "ping"}


@pytest.mark.parametrize(
    "change, path, words",
    [
        ({"v": 2}, "v", "unsupported protocol version 2"),
        ({"v": None}, "v", "unsupported protocol version"),
        ({"v": True}, "v", "unsupported protocol version"),
        ({"type": "launch"}, "type", "unknown message type 'launch'"),
        ({"id": "has space"}, "id", "does not match"),
        ({"id": "x" * 65}, "id", "does not match"),
        ({"name": None}, "name", "required field missing"),
        ({"name": "Reboot!"}, "name", "does not match"),
        ({"args": [1, 2]}, "args", "must be a JSON object"),
        ({"expires": "tomorrow"}, "expires", "must be a finite number"),
        ({"args": {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {"i": 1}}}}}}}}}}, "args", "nests deeper"),
    ],
)
def test_invalid_messages_are_refused_with_the_field_and_the_reason(change, path, words):
    message = {**BASE_COMMAND, **change}
    with pytest.raises(ProtocolError) as error:
        decode(json.dumps(message))
    assert error.value.path == path
    assert words in str(error.value)
    assert str(error.value).startswith(f"{path}: ")


def test_a_missing_version_says_which_version_is_expected():
    with pytest.raises(ProtocolError, match="missing protocol version; expected 1"):
        decode(json.dumps({"type": "command", "id": "c", "name": "ping"}))


def test_a_broken_message_still_reports_its_id_and_type_so_the_device_can_answer_rejected():
    with pytest.raises(ProtocolError) as error:
        decode(json.dumps({**BASE_COMMAND, "name": 42}))
    assert (error.value.message_id, error.value.message_type) == ("cmd-9", "command")


def test_a_message_on_the_wrong_channel_is_refused():
    with pytest.raises(ProtocolError, match="belong on the 'command' channel, not 'credentials'"):
        decode(json.dumps(BASE_COMMAND), channel="credentials")


def test_a_device_message_arriving_on_a_console_channel_is_refused():
    payload = encode_telemetry(message_id="t-1", ts=1.0, seq=1, values={"temperature": 1})
    with pytest.raises(ProtocolError, match="belong on the 'telemetry' channel"):
        decode(payload, channel="command")


@pytest.mark.parametrize(
    "payload, words",
    [
        (b"not json", "not valid JSON"),
        (b"\xff\xfe", "not UTF-8"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"v": 1, "type": "command", "id": "a", "id": "b", "name": "ping"}', "duplicate key 'id'"),
        (b'{"v": 1, "type": "telemetry", "id": "a", "ts": NaN, "seq": 1, "values": {}}', "NaN is not valid JSON"),
        (b"[" * 30000 + b"]" * 30000, "bytes; the limit is"),
        (b"[" * 20000 + b"]" * 20000, "nests too deeply"),
    ],
)
def test_payloads_that_are_not_protocol_at_all_are_refused(payload, words):
    with pytest.raises(ProtocolError, match=words):
        decode(payload)


def test_booleans_are_not_integers():
    with pytest.raises(ProtocolError, match="seq: must be an integer, got bool"):
        encode("telemetry", id="t", ts=1.0, seq=True, values={})


def test_unknown_fields_are_kept_so_newer_consoles_do_not_break_older_devices():
    message = decode(json.dumps({**BASE_COMMAND, "priority": "high"}))
    assert message["priority"] == "high"


def test_encode_refuses_to_build_an_invalid_message():
    with pytest.raises(ProtocolError, match="status: 'maybe' is not one of ok, rejected, failed, expired"):
        encode("ack", id="c", ts=1.0, command="command", status="maybe")


def test_encode_refuses_a_message_over_the_size_limit():
    with pytest.raises(ProtocolError, match="the limit is"):
        encode("config", id="c", config={"blob": "x" * protocol.MAX_MESSAGE_BYTES})


def test_certificate_fields_must_be_pem():
    with pytest.raises(ProtocolError, match="must start with '-----BEGIN CERTIFICATE-----'"):
        encode("certificate", id="c", ref="r", certificate="MIIB...")


@pytest.mark.parametrize(
    "message, valid",
    [
        ({**BASE_COMMAND}, True),
        ({**BASE_COMMAND, "id": ""}, False),
        ({**BASE_COMMAND, "name": "Ping"}, False),
        ({"v": 1, "type": "telemetry", "id": "t", "ts": 1, "seq": -1, "values": {}}, False),
        ({"v": 1, "type": "telemetry", "id": "t", "ts": 1, "seq": 0, "values": {"x": None}}, True),
        ({"v": 1, "type": "telemetry", "id": "t", "ts": 1, "seq": 0, "values": {"x": "1"}}, False),
        ({"v": 1, "type": "ack", "id": "t", "ts": 1, "command": "command", "status": "ok", "detail": "d" * 501}, False),
        (
            {
                "v": 1,
                "type": "firmware_offer",
                "id": "f",
                "version": "1",
                "url": "u",
                "size": 1,
                "sha256": "A" * 64,
                "signature": "A" * 86 + "==",
            },
            False,
        ),
    ],
)
def test_the_published_json_schema_and_the_validator_agree(message, valid):
    schema = json_schema(message["type"])
    schema_says = jsonschema.Draft202012Validator(schema).is_valid(message)
    try:
        protocol.validate(message)
        validator_says = True
    except ProtocolError:
        validator_says = False
    assert schema_says == validator_says == valid
