"""Ingest figures (design.md, "Performance targets"): the same broker, the same generated traffic, in one run:

(a) a bare paho-mqtt subscriber that only counts (the baseline, ~28k msg/s here);
(b) one consumer (security.detection.consumer) with every detector on, each message validated, aggregated,
    written to Redis and the database in batches (target: at least 60% of (a));
(c) two consumers on the shared subscription (target: faster than (b)).

Each subscriber runs in its own process (as in production: the consumer lives in a Celery worker). The traffic is
pre-encoded MQTT PUBLISH packets (QoS 0, ~200-byte telemetry) written by raw sockets, one per device, so the
generator costs next to nothing. A run sends fewer messages than the broker's per-client queue
(MQTT_MAX_QUEUED_MESSAGES), so a slow subscriber is queued for, never dropped; drops are counted anyway (sent -
received, and the broker's own $SYS dropped counter).

The rate of a run is messages / (last received - first received) summed over its subscribers. Devices send at a
rate that is their normal (the rate ceiling is raised for the run): the figure is the cost of evaluating every
detector on every batch, not of writing alerts.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

from security.detection.wire import connect_packet, publish_packet

from .broker import RESULTS, record

IDLE_SECONDS = 3.0  # a subscriber reports once nothing has arrived for this long


def ing_client_id(n: int) -> str:
    return f"device-ing{n:05d}"


def ing_secret(n: int) -> str:
    return f"ingest-secret-{n:05d}-0123456789abcdefghijklmnopqrstuvwxyz"


def ensure_fleet(devices: int) -> None:
    from django.utils import timezone

    from devices.models import Device
    from security.enforcement.secrets import hash_secret
    from security.models import DeviceCredential

    existing = set(Device.objects.filter(client_id__startswith="device-ing").values_list("client_id", flat=True))
    new = [n for n in range(devices) if ing_client_id(n) not in existing]
    Device.objects.bulk_create([Device(client_id=ing_client_id(n)) for n in new], batch_size=5000)
    pks = dict(Device.objects.filter(client_id__startswith="device-ing").values_list("client_id", "pk"))
    now = timezone.now()
    DeviceCredential.objects.bulk_create(
        [
            DeviceCredential(
                device_id=pks[ing_client_id(n)], password_hash=hash_secret(ing_secret(n), iterations=1), issued_at=now
            )
            for n in new
        ],
        batch_size=5000,
    )


def ing_payload_key(n: int) -> bytes:
    """A fixed payload key per bench device (so runs are repeatable); real keys are random (payload_key_issue)."""
    import hashlib

    return hashlib.sha256(f"bench-payload-key-{n}".encode()).digest()


def ensure_payload_keys(devices: int) -> None:
    """Every bench device gets its payload key row (encrypted at rest like any other); not required, so the clear
    runs are accepted as before."""
    from devices.models import Device
    from fleetkeeper_device import sealing
    from security.models import PayloadKey
    from security.payloads import key_encrypt

    have = set(PayloadKey.objects.filter(client_id__startswith="device-ing").values_list("client_id", flat=True))
    pks = dict(Device.objects.filter(client_id__startswith="device-ing").values_list("client_id", "pk"))
    rows = []
    for n in range(devices):
        client_id = ing_client_id(n)
        if client_id in have:
            continue
        raw = ing_payload_key(n)
        key_id = sealing.key_id(raw).hex()
        rows.append(
            PayloadKey(
                device_id=pks[client_id],
                client_id=client_id,
                key_id=key_id,
                encrypted_key=key_encrypt(raw, client_id=client_id, key_id=key_id),
            )
        )
    PayloadKey.objects.bulk_create(rows, batch_size=2000)


def build_traffic(devices: int, per_device: int, seed: int = 5, *, sealed: bool = False) -> list[bytes]:
    """One buffer of PUBLISH packets per device: valid telemetry, values in a steady range. ``sealed``: the same
    messages sealed with the device's payload key (fleetkeeper_device.sealing, 43 bytes more each)."""
    from fleetkeeper_device import sealing

    rng = random.Random(seed)
    buffers = []
    now = time.time()
    for n in range(devices):
        client_id = ing_client_id(n)
        topic = f"tx/{client_id}/telemetry"
        key = sealing.PayloadKey(ing_payload_key(n)) if sealed else None
        packets = []
        for seq in range(per_device):
            values = {
                "temperature": round(rng.uniform(20.0, 25.0), 2),
                "battery": rng.randint(60, 90),
                "signal": rng.randint(-80, -60),
                "humidity": round(rng.uniform(40.0, 50.0), 1),
            }
            message = {
                "v": 1,
                "type": "telemetry",
                "id": f"{client_id}-{seq}",
                "ts": now + seq,
                "seq": seq,
                "values": values,
            }
            payload = json.dumps(message, separators=(",", ":")).encode()
            payload += b" " * max(0, 200 - len(payload))  # ~200-byte payloads, like the baseline measurements
            if key is not None:
                payload = key.seal(
                    payload, topic=topic, client_id=client_id, counter=seq + 1, direction=sealing.DEVICE_TO_CONSOLE
                )
            packets.append(publish_packet(topic, payload))
        buffers.append(b"".join(packets))
    return buffers


def connect_devices(port: int, devices: int) -> list[socket.socket]:
    sockets = []
    for n in range(devices):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(
            connect_packet(client_id=ing_client_id(n), username=ing_client_id(n), password=ing_secret(n), keepalive=600)
        )
        ack = sock.recv(4)
        if len(ack) < 4 or ack[0] != 0x20 or ack[3] != 0:
            raise RuntimeError(f"{ing_client_id(n)} was refused by the broker: {ack!r}")
        sockets.append(sock)
    return sockets


def send_all(sockets: list[socket.socket], buffers: list[bytes], chunk: int = 16 * 1024) -> float:
    """Interleave the devices' buffers in chunks so every device sends throughout the run."""
    started = time.monotonic()
    offsets = [0] * len(sockets)
    remaining = len(sockets)
    while remaining:
        remaining = 0
        for i, sock in enumerate(sockets):
            start = offsets[i]
            if start >= len(buffers[i]):
                continue
            sock.sendall(buffers[i][start : start + chunk])
            offsets[i] = start + chunk
            remaining += 1
    return time.monotonic() - started


# --- the subscriber processes -------------------------------------------------------------------------------


def _spawn(role: str, replica: int, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.ingest", role, str(replica)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )


def _wait_ready(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.strip() == "ready":
            return
        if proc.poll() is not None:
            raise RuntimeError(f"subscriber exited: {proc.stderr.read()[-2000:]}")
    raise TimeoutError("subscriber not ready")


def _child_bare(replica: int) -> None:
    import threading

    import paho.mqtt.client as mqtt
    from django.conf import settings

    from security.enforcement.state import consumer_usernames

    username = consumer_usernames()[replica - 1]
    state = {"count": 0, "first": 0.0, "last": 0.0}
    subscribed = threading.Event()

    def on_message(_c, _u, _m):
        now = time.time()
        if not state["count"]:
            state["first"] = now
        state["count"] += 1
        state["last"] = now

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=username, protocol=mqtt.MQTTv311)
    client.username_pw_set(username, settings.MQTT_CONSUMER_PASSWORD)
    client.on_message = on_message
    client.on_subscribe = lambda *_a: subscribed.set()
    client.connect(settings.MQTT_HOST, settings.MQTT_PORT, keepalive=60)
    group = settings.MQTT_SHARED_SUBSCRIPTION_GROUP
    client.subscribe(f"$share/{group}/tx/+/telemetry", qos=1)
    client.loop_start()
    subscribed.wait(10)
    print("ready", flush=True)
    _wait_idle(lambda: state["count"], lambda: state["last"])
    client.disconnect()
    client.loop_stop()
    print(
        json.dumps({"count": state["count"], "first": state["first"], "last": state["last"], "cpu": _cpu_seconds()}),
        flush=True,
    )


def _child_lean(replica: int) -> None:
    """Not a target, a ceiling: the consumer's own MQTT client (security/detection/wire.py) that only counts, to
    show how fast the broker delivers to one and to two subscribers on this machine."""
    from django.conf import settings

    from security.detection.consumer import Consumer
    from security.detection.wire import Subscriber
    from security.enforcement.state import consumer_usernames

    state = {"count": 0, "first": 0.0, "last": 0.0}

    def on_publishes(publishes):
        now = time.time()
        if not state["count"]:
            state["first"] = now
        state["count"] += len(publishes)
        state["last"] = now

    username = consumer_usernames()[replica - 1]
    subscriber = Subscriber(
        host=settings.MQTT_HOST,
        port=settings.MQTT_PORT,
        username=username,
        password=settings.MQTT_CONSUMER_PASSWORD,
        subscriptions=Consumer.subscriptions(),
        on_publishes=on_publishes,
    ).start()
    subscriber.wait_subscribed(10)
    print("ready", flush=True)
    _wait_idle(lambda: state["count"], lambda: state["last"])
    subscriber.stop()
    print(
        json.dumps({"count": state["count"], "first": state["first"], "last": state["last"], "cpu": _cpu_seconds()}),
        flush=True,
    )


def _child_consumer(replica: int) -> None:
    from security.detection.consumer import Consumer

    consumer = Consumer(replica=replica).start()
    marks = {"first": 0.0, "last": 0.0, "seen": 0}

    def processed():
        # Done = processed (validated, aggregated, written), not merely received.
        n = consumer.stats.processed
        if n and not marks["first"]:
            marks["first"] = time.time() - consumer.flush_seconds  # the first batch started before we noticed
        if n != marks["seen"]:
            marks["seen"], marks["last"] = n, time.time()
        return n

    deadline = time.monotonic() + 10
    while consumer.stats.received == 0 and time.monotonic() < deadline and not _subscribed(consumer):
        time.sleep(0.05)
    time.sleep(0.5)
    print("ready", flush=True)
    first_received = _wait_idle(processed, lambda: marks["last"], received=lambda: consumer.stats.received)
    consumer.stop()
    print(
        json.dumps(
            {
                "count": consumer.stats.processed,
                "first": consumer.stats.first_message_at or first_received or marks["first"],
                "last": consumer.stats.last_batch_at or marks["last"],
                "stats": consumer.stats.as_dict(),
                "cpu": _cpu_seconds(),
                "client": consumer.client_kind,
            }
        ),
        flush=True,
    )


def _cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return round(usage.ru_utime + usage.ru_stime, 2)


def _subscribed(consumer) -> bool:
    return consumer.connected()


def _wait_idle(count, last, received=None) -> float:
    """Block until messages arrived and then nothing for IDLE_SECONDS; returns when the first one was received."""
    first_received = 0.0
    while True:
        time.sleep(0.05)
        n = count()
        if received is not None and not first_received and received():
            first_received = time.time()
        if n and time.time() - last() > IDLE_SECONDS:
            return first_received


def _collect(procs: list[subprocess.Popen]) -> list[dict]:
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if not lines:
            raise RuntimeError(f"subscriber failed: {err[-3000:]}")
        results.append(json.loads(lines[-1]))
    return results


def _run_once(label: str, role: str, replicas: int, env: dict, sockets, buffers, total: int, broker) -> dict:
    procs = [_spawn(role, r, env) for r in range(1, replicas + 1)]
    for proc in procs:
        _wait_ready(proc)
    broker_cpu = broker.cpu_seconds()
    sent_in = send_all(sockets, buffers)
    results = _collect(procs)
    broker_cpu = broker.cpu_seconds() - broker_cpu
    if broker.cfg.debug_log:  # DETECTION_DENIED_PUBLISHES: what the broker's debug log costs in bytes
        debug_log = Path(broker.cfg.debug_log)
        print(f"  (broker debug log now {debug_log.stat().st_size if debug_log.exists() else 0:,} bytes)", flush=True)
    count = sum(r["count"] for r in results)
    first = min(r["first"] for r in results if r["count"])
    last = max(r["last"] for r in results)
    rate = count / max(last - first, 1e-6)
    client = f", {results[0]['client']} client" if role == "consumer" else ""
    print(
        f"  ({label}{client}: {count:,} of {total:,} in {last - first:.2f} s, sent in {sent_in:.2f} s; "
        f"CPU s: broker {broker_cpu:.2f}, subscribers {[r.get('cpu') for r in results]}; "
        f"load average {os.getloadavg()[0]:.2f}"
        + (f"; consumer stats {[r.get('stats', {}) for r in results]}" if role == "consumer" else "")
        + ")",
        flush=True,
    )
    return {"rate": rate, "count": count, "dropped": total - count}


def run(*, devices: int = 200, per_device: int = 500) -> list:
    from django.conf import settings
    from django.test.utils import override_settings

    from security.brokers import broker_config, get_adapter

    from .broker import Broker
    from .processes import Redis

    redis_server = Redis()
    env = {
        **os.environ,
        "REDIS_URL": redis_server.url,
        "CELERY_BROKER_URL": redis_server.url,
        "MQTT_CONSUMER_REPLICAS": "2",
        # The bench's devices send far above a real device's rhythm: that is their normal here.
        "DETECTION_RATE_ABSOLUTE_PER_WINDOW": "1000000000",
        "LOG_LEVEL": "WARNING",
    }
    total = devices * per_device
    broker = None
    try:
        with override_settings(MQTT_CONSUMER_REPLICAS=2, REDIS_URL=redis_server.url):
            from security.services import policy_desired

            ensure_fleet(devices)
            ensure_payload_keys(devices)
            cfg = broker_config()
            Path(cfg.broker_dir).mkdir(parents=True, exist_ok=True)
            get_adapter().write(policy_desired())
            broker = Broker(cfg)
            broker.start()
            print(
                f"Load average {os.getloadavg()[0]:.2f}. "
                f"Ingest: {devices} devices x {per_device} telemetry messages = {total:,} per run "
                f"(QoS 0, ~200-byte payloads; broker queue per client {settings.MQTT_MAX_QUEUED_MESSAGES:,})",
                flush=True,
            )
            buffers = build_traffic(devices, per_device)
            sealed_buffers = build_traffic(devices, per_device, sealed=True)
            sockets = connect_devices(cfg.port, devices)
            try:
                bare = _run_once("bare paho subscriber", "bare", 1, env, sockets, buffers, total, broker)
                one = _run_once("one consumer, every detector", "consumer", 1, env, sockets, buffers, total, broker)
                # The same messages sealed (payload encryption): opened, replay-checked, then the same work.
                sealed = _run_once(
                    "one consumer, sealed payloads", "consumer", 1, env, sockets, sealed_buffers, total, broker
                )
                two = _run_once(
                    "two consumers, shared subscription", "consumer", 2, env, sockets, buffers, total, broker
                )
                # Not targets: the broker's delivery ceiling with the lean client counting only, to one and to two.
                lean_one = _run_once("lean client counting only", "lean", 1, env, sockets, buffers, total, broker)
                lean_two = _run_once("two lean clients counting only", "lean", 2, env, sockets, buffers, total, broker)
            finally:
                for sock in sockets:
                    sock.close()
    finally:
        if broker is not None:
            broker.stop()
        redis_server.stop()
    record("ingest: bare paho subscriber", bare["rate"], "msg/s", note=f"dropped {bare['dropped']}")
    record("ingest: lean client counting only (ceiling)", lean_one["rate"], "msg/s", note="not a target")
    record("ingest: two lean clients counting only (ceiling)", lean_two["rate"], "msg/s", note="not a target")
    record(
        "ingest: one consumer, every detector",
        one["rate"],
        "msg/s",
        baseline=bare["rate"],
        baseline_label="bare paho",
        note=f"{one['rate'] / bare['rate']:.2f} of bare (target >= 0.60: "
        f"{'PASS' if one['rate'] >= 0.6 * bare['rate'] else 'FAIL'}); dropped {one['dropped']}",
    )
    record(
        "ingest: two consumers, shared subscription",
        two["rate"],
        "msg/s",
        baseline=one["rate"],
        baseline_label="one consumer",
        note=f"{two['rate'] / one['rate']:.2f}x one consumer (target > 1: "
        f"{'PASS' if two['rate'] > one['rate'] else 'FAIL'}); dropped {two['dropped']}",
    )
    record(
        "ingest: one consumer, sealed payloads",
        sealed["rate"],
        "msg/s",
        baseline=bare["rate"],
        baseline_label="bare paho",
        note=f"{sealed['rate'] / bare['rate']:.2f} of bare (target >= 0.60: "
        f"{'PASS' if sealed['rate'] >= 0.6 * bare['rate'] else 'FAIL'}); {sealed['rate'] / one['rate']:.2f} of clear; "
        f"dropped {sealed['dropped']}",
    )
    ratio_one = one["rate"] / bare["rate"]
    # As ratios with their own verdicts (record's target is "value below target").
    RESULTS.append(
        {
            "name": "ingest: one consumer / bare",
            "value": ratio_one,
            "unit": "ratio",
            "target": None,
            "baseline": None,
            "baseline_label": "",
            "verdict": "PASS" if ratio_one >= 0.6 else "FAIL",
            "note": "target >= 0.60",
        }
    )
    RESULTS.append(
        {
            "name": "ingest: two consumers / one",
            "value": two["rate"] / one["rate"],
            "unit": "ratio",
            "target": None,
            "baseline": None,
            "baseline_label": "",
            "verdict": "PASS" if two["rate"] > one["rate"] else "FAIL",
            "note": "target > 1",
        }
    )
    return RESULTS


if __name__ == "__main__":
    # A subscriber process: python -m bench.ingest bare|consumer <replica>
    import django

    django.setup()
    role, replica = sys.argv[1], int(sys.argv[2])
    {"bare": _child_bare, "lean": _child_lean, "consumer": _child_consumer}[role](replica)
