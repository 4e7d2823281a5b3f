"""The consumer's lean MQTT subscriber (security/detection/wire.py): the frame parser on its own (partial frames,
remaining-length varints, QoS 1 packet ids, random bytes), the consumer's fold fed by it, and the subscriber against
the real broker (CONNACK refusal, QoS 1 acknowledgement, reconnect)."""

import random
import socket
import threading
import time

import pytest
from django.conf import settings

from fleetkeeper_device import protocol
from security.detection import wire
from security.detection.consumer import Consumer
from tests.support.waiting import wait_until

PUBLISH = wire.publish_packet


def frames(*packets: bytes) -> bytes:
    return b"".join(packets)


def test_one_read_with_many_frames_gives_every_publish_in_order():
    stream = frames(*(PUBLISH(f"tx/d{i}/telemetry", f"p{i}".encode()) for i in range(100)))
    publishes, others = wire.FrameReader().feed(stream)
    assert others == []
    assert [(t, p) for t, p, _q, _i in publishes] == [
        (f"tx/d{i}/telemetry".encode(), f"p{i}".encode()) for i in range(100)
    ]


@pytest.mark.parametrize("size", [0, 1, 127, 128, 16_383, 16_384, 70_000, 2_100_000])
def test_remaining_length_varints_of_every_width(size):
    packet = PUBLISH("t", b"x" * size)
    width = len(wire.encode_remaining_length(size + 3))
    assert packet[1 : 1 + width] == wire.encode_remaining_length(size + 3)
    publishes, _ = wire.FrameReader().feed(packet)
    assert publishes == [(b"t", b"x" * size, 0, 0)]


def test_a_stream_cut_at_every_byte_gives_the_same_frames():
    rng = random.Random(1)
    packets = [
        PUBLISH(f"tx/dev-{i}/telemetry", rng.randbytes(rng.choice([0, 5, 130, 20_000])), qos=i % 2, packet_id=i + 1)
        for i in range(30)
    ]
    packets.insert(7, b"\x90\x03\x00\x01\x01")  # a SUBACK in between
    stream = frames(*packets)
    whole, whole_others = wire.FrameReader().feed(stream)
    assert len(whole) == 30 and whole_others == [(0x90, b"\x00\x01\x01")]
    for step in (1, 2, 3, 7, 1000):
        reader = wire.FrameReader()
        got, got_others = [], []
        for start in range(0, len(stream), step):
            publishes, others = reader.feed(stream[start : start + step])
            got += publishes
            got_others += others
        assert got == whole and got_others == whole_others and reader.pending == 0


def test_qos1_publishes_carry_their_packet_id():
    reader = wire.FrameReader()
    publishes, _ = reader.feed(PUBLISH("tx/a/status", b"{}", qos=1, packet_id=0xBEEF) + PUBLISH("x", b"y"))
    assert publishes == [(b"tx/a/status", b"{}", 1, 0xBEEF), (b"x", b"y", 0, 0)]
    assert wire.puback_packet(0xBEEF) == b"\x40\x02\xbe\xef"


@pytest.mark.parametrize(
    ("stream", "error"),
    [
        (b"\x30\xff\xff\xff\xff\x01", "longer than four bytes"),
        (b"\x36\x05\x00\x01tab", "QoS 3"),
        (b"\x32\x03\x00\x01t", "packet id"),
        (b"\x32\x05\x00\x01t\x00\x00", "packet id 0"),
        (b"\x30\x03\x00\x09t", "shorter than its topic"),
        (b"\x30\x01\x00", "without a topic"),
    ],
)
def test_invalid_frames_are_a_frame_error(stream, error):
    with pytest.raises(wire.FrameError, match=error):
        wire.FrameReader().feed(stream)


def test_a_frame_over_the_limit_is_refused_before_it_is_buffered():
    reader = wire.FrameReader(max_frame=1000)
    with pytest.raises(wire.FrameError, match="limit"):
        reader.feed(b"\x30" + wire.encode_remaining_length(5000) + b"\x00")


def test_random_bytes_only_ever_give_frames_or_frame_error():
    rng = random.Random(6)
    outcomes = {"frames": 0, "errors": 0}
    for _ in range(3000):
        reader = wire.FrameReader(max_frame=1 << 16)
        data = rng.randbytes(rng.randint(0, 400))
        if rng.random() < 0.5:  # often a valid start, then garbage
            data = PUBLISH("tx/a/telemetry", b"{}") + data
        try:
            for start in range(0, len(data), 37):
                publishes, others = reader.feed(data[start : start + 37])
                outcomes["frames"] += len(publishes) + len(others)
                for topic, payload, qos, packet_id in publishes:
                    assert isinstance(topic, bytes) and isinstance(payload, bytes) and qos in (0, 1, 2)
        except wire.FrameError:
            outcomes["errors"] += 1
    assert outcomes["frames"] and outcomes["errors"]


@pytest.mark.django_db
def test_random_publishes_through_the_fold_never_raise_and_are_counted(settings):
    """Whatever the topic and payload bytes, the consumer's fold counts them: bad topics apart, the rest per device
    (valid or malformed). Fed through the same callback the subscriber calls."""
    consumer = Consumer(replica=1, monitor=False)
    rng = random.Random(9)
    publishes = []
    for i in range(10_000):
        kind = i % 4
        if kind == 0:
            topic = rng.randbytes(rng.randint(0, 40))
        elif kind == 1:
            topic = f"tx/dev-{i % 7}/{rng.choice(['telemetry', 'status', 'ack', 'csr'])}".encode()
        elif kind == 2:
            topic = b"tx/\xff\xfe/telemetry"
        else:
            topic = b"tx/dev-1/telemetry"
        publishes.append((topic, rng.randbytes(rng.randint(0, 300)), 0, 0))
    for start in range(0, len(publishes), 500):
        consumer._on_publishes(publishes[start : start + 500])
    assert consumer.stats.received == 10_000 and consumer.stats.errors == 0
    folded = sum(d.messages for d in consumer._current.values())
    assert folded + consumer.stats.bad_topic == 10_000
    assert sum(d.malformed for d in consumer._current.values()) == folded  # random bytes are never valid


@pytest.mark.django_db
def test_acks_reach_the_rotation_inbox_and_a_flood_of_them_is_bounded_and_counted(monkeypatch):
    from security.detection import consumer as consumer_module

    received = []
    monkeypatch.setattr(consumer_module, "COMMAND_REPLIES_MAX", 100)
    monkeypatch.setattr("security.rotation.inbox.device_replies_received", lambda replies: received.extend(replies))
    consumer = Consumer(replica=1, monitor=False)
    ack = protocol.encode("ack", id="cmd-1", ts=time.time(), command="ping", status="ok")
    consumer._on_publishes([(b"tx/dev-7/ack", ack, 1, 1)])
    consumer.drain()
    assert [(client_id, channel) for client_id, channel, _message in received] == [("dev-7", "ack")]
    consumer._on_publishes([(b"tx/dev-8/ack", ack, 1, n + 1) for n in range(150)])
    assert len(consumer.replies) == 100 and consumer.stats.replies_dropped == 50
    consumer.drain()
    assert len(received) == 101 and not consumer.replies


# --- against the real broker ------------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_the_subscriber_acknowledges_qos1_reconnects_and_reports_a_refusal(mosquitto, operator):
    from security import services
    from tests.factories import DeviceFactory
    from tests.support.broker import MqttClient

    device = DeviceFactory()
    secret = services.credential_issue(actor=operator, device=device).password
    assert services.enforcement_apply(coalesce=False).probe.ok
    got: list = []
    lock = threading.Lock()

    def on_publishes(publishes):
        with lock:
            got.extend(publishes)

    def subscriber(password):
        return wire.Subscriber(
            host="127.0.0.1",
            port=mosquitto.port,
            username=settings.MQTT_CONSUMER_USERNAME,
            password=password,
            subscriptions=Consumer.subscriptions(),
            on_publishes=on_publishes,
            reconnect_max=1,
        ).start()

    refused = subscriber("wrong")
    good = subscriber(settings.MQTT_CONSUMER_PASSWORD)
    publisher = None
    try:
        # A refused CONNACK is reported and retried with backoff, never a crash.
        assert wait_until(lambda: refused.stats.refusals >= 2), refused.stats
        assert "CONNACK 5" in refused.stats.last_error and not refused.is_connected()
        assert good.wait_subscribed(10), good.stats
        publisher = MqttClient(mosquitto.port, client_id=device.client_id, username=device.client_id, password=secret)
        assert publisher.connect() == 0
        # More QoS 1 messages than the broker keeps in flight per client (max_inflight_messages): they all arrive
        # only if the subscriber acknowledges them.
        count = settings.MQTT_MAX_INFLIGHT_MESSAGES * 3
        status = protocol.encode("status", id="s-1", ts=time.time(), firmware="1.0.0", boot_time=1.0, uptime=5)
        for _ in range(count):
            publisher.client.publish(f"tx/{device.client_id}/status", status, qos=1)
        assert wait_until(lambda: len(got) == count), (len(got), good.stats)
        assert {(t, q) for t, _p, q, _i in got} == {(f"tx/{device.client_id}/status".encode(), 1)}
        # The broker restarts: the subscriber comes back by itself and receives again.
        publisher.close()
        mosquitto.restart()
        assert wait_until(lambda: good.stats.sessions >= 2 and good.is_connected(), timeout=15), good.stats
        publisher = MqttClient(mosquitto.port, client_id=device.client_id, username=device.client_id, password=secret)
        assert publisher.connect() == 0
        publisher.client.publish(f"tx/{device.client_id}/status", status, qos=1)
        assert wait_until(lambda: len(got) == count + 1)
    finally:
        if publisher is not None:
            publisher.close()
        good.stop()
        refused.stop()
    assert not good._thread.is_alive() and not refused._thread.is_alive()


class FakeBroker:
    """A listening socket that plays the broker for ``sessions`` connections: CONNACK 0, SUBACK granted, then
    ``after_subscribe(conn, n)`` (n: 1 for the first session). Closed with the context."""

    def __init__(self, after_subscribe, *, sessions: int):
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(5)
        self.port = self.server.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.after_subscribe, self.sessions = after_subscribe, sessions
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        self.server.settimeout(15)
        while len(self.accepted) < self.sessions:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.accepted.append(conn)
            conn.recv(4096)  # CONNECT
            conn.sendall(b"\x20\x02\x00\x00")
            conn.recv(4096)  # SUBSCRIBE
            conn.sendall(b"\x90\x03\x00\x01\x01")
            self.after_subscribe(conn, len(self.accepted))

    def __enter__(self):
        return self

    def __exit__(self, *_exc):
        self.close()

    def close(self):
        self.server.close()
        for conn in self.accepted:
            conn.close()


def test_a_broker_that_sends_garbage_is_dropped_and_reconnected_to():
    """A peer that answers CONNACK and then bytes that are not MQTT: FrameError, the connection is made again; the
    valid PUBLISH before the bad bytes is still delivered."""
    rng = random.Random(4)

    def garbage(conn, _n):
        conn.sendall(PUBLISH("tx/a/telemetry", b"{}") + b"\x30\xff\xff\xff\xff\x7f" + rng.randbytes(100))

    got = []
    with FakeBroker(garbage, sessions=3) as peer:
        sub = wire.Subscriber(
            host="127.0.0.1",
            port=peer.port,
            username="u",
            password="p",
            subscriptions=[("t", 1)],
            on_publishes=got.extend,
            reconnect_max=1,
        ).start()
        try:
            assert wait_until(lambda: sub.stats.protocol_errors >= 2, timeout=15), sub.stats
            assert sub.stats.sessions >= 2 and len(got) >= 2
            assert "longer than four bytes" in sub.stats.last_error
        finally:
            sub.stop()


@pytest.mark.serial  # the interval between two pings is measured
def test_keepalive_pings_at_half_the_interval_and_a_silent_broker_is_left():
    """keepalive=2: a PINGREQ after ~1 s of quiet; the first peer answers (the session stays), the second never
    answers anything after SUBACK, so the subscriber gives up on it after 1.5 x keepalive + 1 s and reconnects."""
    pings: list[float] = []

    def pong_then_silence(conn, n):
        conn.settimeout(0.2)
        deadline = time.monotonic() + (3.5 if n == 1 else 0)
        while time.monotonic() < deadline:
            try:
                data = conn.recv(16)
            except TimeoutError:
                continue
            if data == b"\xc0\x00":
                pings.append(time.monotonic())
                conn.sendall(b"\xd0\x00")
        if n == 1:
            conn.close()  # the first session ends; the second is left silent

    peer = FakeBroker(pong_then_silence, sessions=2)
    sessions = peer.accepted
    sub = wire.Subscriber(
        host="127.0.0.1",
        port=peer.port,
        username="u",
        password="p",
        subscriptions=[("t", 1)],
        on_publishes=lambda _p: None,
        keepalive=2,
        reconnect_max=1,
    ).start()
    try:
        assert wait_until(lambda: len(pings) >= 2, timeout=10), pings
        assert 0.5 < pings[1] - pings[0] < 2.0
        assert wait_until(lambda: len(sessions) == 2 and sub.is_connected(), timeout=10)
        silent_since = time.monotonic()
        assert wait_until(lambda: sub.stats.disconnects >= 2, timeout=15), sub.stats
        assert time.monotonic() - silent_since >= 3.0  # not before 1.5 x keepalive
        assert "nothing from the broker" in sub.stats.last_error
    finally:
        sub.stop()
        peer.close()


def test_an_unexpected_error_in_the_callback_reconnects_instead_of_ending_the_thread():
    def one_publish(conn, _n):
        conn.sendall(PUBLISH("tx/a/telemetry", b"{}"))

    calls = []

    def on_publishes(publishes):
        calls.append(publishes)
        if len(calls) == 1:
            raise RuntimeError("a bug in the fold")

    with FakeBroker(one_publish, sessions=2) as peer:
        sub = wire.Subscriber(
            host="127.0.0.1",
            port=peer.port,
            username="u",
            password="p",
            subscriptions=[("t", 1)],
            on_publishes=on_publishes,
            reconnect_max=1,
        ).start()
        try:
            assert wait_until(lambda: len(calls) == 2, timeout=10), sub.stats
            assert "RuntimeError: a bug in the fold" in sub.stats.last_error and sub._thread.is_alive()
        finally:
            sub.stop()
