"""The sealed envelope (fleetkeeper_device/sealing.py): every way a sealed message can be wrong is its own error,
and a device that reboots never reuses a counter."""

import random

import pytest

from fleetkeeper_device import sealing
from fleetkeeper_device.sealing import (
    CONSOLE_TO_DEVICE,
    DEVICE_TO_CONSOLE,
    CounterState,
    DeviceSealer,
    FileCounterStore,
    MalformedEnvelope,
    MemoryCounterStore,
    PayloadKey,
    Replayed,
    ReplayWindow,
    StaleCounter,
    Tampered,
    WrongClient,
    WrongDirection,
    WrongKey,
    WrongTopic,
)

CLIENT = "device-0001"
TOPIC = f"tx/{CLIENT}/telemetry"
MESSAGE = b'{"v":1,"type":"telemetry","id":"a-1","ts":1.0,"seq":1,"values":{"t":21.5}}'


@pytest.fixture
def key():
    return PayloadKey(sealing.generate_key())


def sealed(key, counter=1, *, topic=TOPIC, client_id=CLIENT, plaintext=MESSAGE):
    return key.seal(plaintext, topic=topic, client_id=client_id, counter=counter, direction=DEVICE_TO_CONSOLE)


def open_(key, envelope, *, topic=TOPIC, client_id=CLIENT, direction=DEVICE_TO_CONSOLE):
    return key.open(envelope, topic=topic, client_id=client_id, direction=direction)


def test_round_trip_and_layout(key):
    envelope = sealed(key, 7)
    assert envelope[0] == 0xF5 and envelope[1] == 1
    assert sealing.is_sealed(envelope) and not sealing.is_sealed(MESSAGE)
    assert len(envelope) == len(MESSAGE) + sealing.OVERHEAD == len(MESSAGE) + 43
    header = sealing.peek(envelope)
    assert (header.key_id, header.direction, header.counter) == (key.key_id, DEVICE_TO_CONSOLE, 7)
    opened = open_(key, envelope)
    assert (opened.plaintext, opened.counter, opened.key_id) == (MESSAGE, 7, key.key_id)
    assert MESSAGE not in envelope  # encrypted, not only signed


def test_key_text_round_trip_and_clear_errors():
    raw = sealing.generate_key()
    text = sealing.encode_key(raw)
    assert text.startswith("fkpk1.") and sealing.decode_key(text) == raw and sealing.decode_key(raw) == raw
    assert PayloadKey(text).key_id == PayloadKey(raw).key_id == sealing.key_id(raw)
    with pytest.raises(ValueError, match="starts with 'fkpk1.'"):
        sealing.decode_key("abc")
    with pytest.raises(ValueError, match="decodes to 3 bytes"):
        sealing.decode_key("fkpk1.AAAA")


def test_tampered_ciphertext_is_tampered(key):
    envelope = bytearray(sealed(key))
    envelope[sealing.HEADER_BYTES + 3] ^= 0x01
    with pytest.raises(Tampered, match="does not authenticate") as caught:
        open_(key, bytes(envelope))
    assert caught.value.code == "tampered" and caught.value.counter == 1


def test_tampered_tag_and_header_counter_are_tampered(key):
    envelope = bytearray(sealed(key, 5))
    envelope[-1] ^= 0x80
    with pytest.raises(Tampered):
        open_(key, bytes(envelope))
    envelope = bytearray(sealed(key, 5))
    envelope[18] ^= 0x01  # the counter's last byte: a replay with a fresh-looking counter does not verify
    with pytest.raises(Tampered):
        open_(key, bytes(envelope))


def test_moved_to_another_devices_topic_is_wrong_topic(key):
    envelope = sealed(key)
    with pytest.raises(WrongTopic, match="tx/device-0002/telemetry") as caught:
        open_(key, envelope, topic="tx/device-0002/telemetry")
    assert caught.value.code == "wrong_topic"
    with pytest.raises(WrongTopic):  # another channel of the same device
        open_(key, envelope, topic=f"tx/{CLIENT}/status")


def test_wrong_client_id_is_wrong_client(key):
    envelope = sealed(key)
    with pytest.raises(WrongClient, match="device-0002") as caught:
        open_(key, envelope, client_id="device-0002")
    assert caught.value.code == "wrong_client"


def test_wrong_key_is_wrong_key_and_names_both_ids(key):
    other = PayloadKey(sealing.generate_key())
    with pytest.raises(WrongKey) as caught:
        open_(other, sealed(key))
    assert key.key_id_hex in str(caught.value) and other.key_id_hex in str(caught.value)
    assert caught.value.code == "wrong_key" and caught.value.key_id == key.key_id_hex


def test_reflected_message_is_wrong_direction(key):
    envelope = sealed(key)
    with pytest.raises(WrongDirection):
        open_(key, envelope, direction=CONSOLE_TO_DEVICE)


@pytest.mark.parametrize("length", [0, 1, 10, sealing.HEADER_BYTES, sealing.OVERHEAD - 1])
def test_truncated_envelope_is_malformed(key, length):
    with pytest.raises(MalformedEnvelope, match="truncated"):
        open_(key, sealed(key)[:length])


def test_unknown_version_and_marker_are_malformed(key):
    envelope = bytearray(sealed(key))
    envelope[1] = 9
    with pytest.raises(MalformedEnvelope, match="version 9"):
        open_(key, bytes(envelope))
    envelope[0], envelope[1] = ord("{"), 1
    with pytest.raises(MalformedEnvelope, match="not a sealed message"):
        open_(key, bytes(envelope))


def test_replayed_counter_and_counter_going_backwards():
    window = ReplayWindow()
    for counter in (1, 2, 3, 5, 4):  # 4 after 5: reordered, accepted once
        window.accept(counter)
    with pytest.raises(Replayed, match="accepted before") as caught:
        window.accept(3)
    assert caught.value.code == "replayed" and not isinstance(caught.value, StaleCounter)
    window.accept(5000)
    with pytest.raises(StaleCounter, match="went backwards") as caught:
        window.accept(6)
    assert caught.value.code == "stale"
    window.accept(5000 - sealing.WINDOW + 1)  # inside the window, never seen
    with pytest.raises(Replayed):
        window.accept(5000)


def test_replay_window_against_a_set_of_everything_seen():
    """Randomised: the bitmap window decides exactly as 'seen before or too old' does."""
    rng = random.Random(3)
    window, seen = ReplayWindow(size=64), set()
    highest = 0
    for _ in range(20_000):
        counter = max(1, highest + rng.randint(-80, 5))
        expected = "stale" if highest - counter >= 64 else "replayed" if counter in seen else "ok"
        try:
            window.accept(counter)
            outcome = "ok"
        except StaleCounter:
            outcome = "stale"
        except Replayed:
            outcome = "replayed"
        assert outcome == expected, (counter, highest)
        if outcome == "ok":
            seen.add(counter)
            highest = max(highest, counter)


def test_fuzzed_envelopes_only_ever_raise_sealing_errors(key):
    rng = random.Random(11)
    good = sealed(key, 42)
    for _ in range(3000):
        data = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            choice = rng.random()
            if choice < 0.6 and data:
                data[rng.randrange(len(data))] = rng.randrange(256)
            elif choice < 0.8:
                del data[rng.randrange(len(data) + 1) :]
            else:
                data += rng.randbytes(rng.randint(1, 8))
        if bytes(data) == good:
            continue
        with pytest.raises(sealing.SealingError):
            open_(key, bytes(data))


def test_device_sealer_never_reuses_a_counter_across_reboots(tmp_path):
    raw = sealing.generate_key()
    store = FileCounterStore(tmp_path / "counters.json")
    first = DeviceSealer(raw, CLIENT, counters=store, reserve=10)
    counters = [sealing.peek(first.seal(TOPIC, MESSAGE)).counter for _ in range(13)]
    assert counters == list(range(1, 14))
    assert store.load().sent_reserved == 20  # reserved ahead, written before use
    rebooted = DeviceSealer(raw, CLIENT, counters=FileCounterStore(tmp_path / "counters.json"), reserve=10)
    after = sealing.peek(rebooted.seal(TOPIC, MESSAGE)).counter
    assert after == 21 and after > max(counters)
    assert (tmp_path / "counters.json").stat().st_mode & 0o777 == 0o600


def test_device_sealer_opens_console_messages_once_even_after_a_reboot():
    raw = sealing.generate_key()
    console = PayloadKey(raw)
    topic = f"rx/{CLIENT}/credentials"
    message = console.seal(b"{}", topic=topic, client_id=CLIENT, counter=3, direction=CONSOLE_TO_DEVICE)
    store = MemoryCounterStore()
    device = DeviceSealer(raw, CLIENT, counters=store)
    assert device.open(topic, message) == b"{}"
    with pytest.raises(Replayed):
        device.open(topic, message)
    assert store.load() == CounterState(0, 3)
    with pytest.raises(Replayed):  # a fresh process restored from the store still refuses it
        DeviceSealer(raw, CLIENT, counters=store).open(topic, message)
    with pytest.raises(WrongDirection):  # the device's own telemetry reflected back to it
        device.open(topic, DeviceSealer(raw, CLIENT).seal(topic, b"{}"))


def test_the_documented_test_vector_is_what_the_library_produces():
    """docs/device-protocol.md, section 10: firmware teams check their implementation against it."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "device-protocol.md").read_text()
    key = PayloadKey("fkpk1.AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8")
    message = b'{"v":1,"type":"telemetry","id":"a1-1","ts":1700000000.0,"seq":1,"values":{"temperature":21.5}}'
    envelope = key.seal(message, topic="tx/device-0042/telemetry", client_id="device-0042", counter=1, direction=1)
    assert key.key_id_hex == "f2674418423be25d" and f"key id `{key.key_id_hex}`" in doc
    assert envelope.hex() in doc and f"{len(envelope)} bytes" in doc
    assert message.decode() in doc


def test_device_client_opens_sealed_console_messages_and_seals_its_answer():
    """DeviceClient with a payload key: a sealed command on rx/<id>/command is opened and answered with a sealed ack;
    the same sealed command again (a replay), a tampered one, or clear text when refused, is not executed."""
    from types import SimpleNamespace

    from fleetkeeper_device import DeviceClient, protocol

    raw = sealing.generate_key()
    published = []
    device = DeviceClient(CLIENT, host="127.0.0.1", secret="s", payload_key=sealing.encode_key(raw))
    device._mqtt = SimpleNamespace(publish=lambda topic, payload, qos=0: published.append((topic, payload)))
    console = PayloadKey(raw)
    topic = f"rx/{CLIENT}/command"
    command = protocol.encode("command", id="cmd-1", name="ping")
    sealed_command = console.seal(command, topic=topic, client_id=CLIENT, counter=1, direction=CONSOLE_TO_DEVICE)

    device._on_message(None, None, SimpleNamespace(topic=topic, payload=sealed_command))
    assert len(published) == 1
    ack_topic, ack = published[0]
    assert ack_topic == f"tx/{CLIENT}/ack" and sealing.is_sealed(ack)
    opened = console.open(ack, topic=ack_topic, client_id=CLIENT, direction=DEVICE_TO_CONSOLE)
    assert protocol.decode(opened.plaintext, channel="ack")["status"] == "ok"

    device._on_message(None, None, SimpleNamespace(topic=topic, payload=sealed_command))  # replayed
    tampered = bytearray(console.seal(command, topic=topic, client_id=CLIENT, counter=2, direction=CONSOLE_TO_DEVICE))
    tampered[-3] ^= 4
    device._on_message(None, None, SimpleNamespace(topic=topic, payload=bytes(tampered)))
    assert len(published) == 1
    assert device.stats["sealed_replayed"] == 1 and device.stats["sealed_tampered"] == 1

    device.refuse_clear_messages = True
    device._on_message(
        None, None, SimpleNamespace(topic=topic, payload=protocol.encode("command", id="c2", name="ping"))
    )
    assert len(published) == 1 and device.stats["clear_refused"] == 1
