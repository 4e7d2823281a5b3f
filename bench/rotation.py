"""Rotation figures (issue 7, "Scale"; design.md, "Performance targets"):

10,000 devices with secrets in the fleet, all connected as simulated devices that implement the device half of the
handover; a real Celery worker, the MQTT consumer (``manage.py consume``, the acks reach the rotation inbox through
it), Redis and Mosquitto. The rotation starts the way an operator's campaign does (a canary wave of 100, then the
rest in one wave; the campaign task judges the canary before it starts the rest), and the figure is the time from
the campaign's creation until all 10,000 rotations are issued, delivered, confirmed by the devices and switched on
the broker (target < 60 s); also how many devices reconnected with their new secret (seen by the devices) and when
the campaign completed (the console saw every reconnect).

Baseline in the same run: the console's command identity publishes one plain QoS 1 message to each of the same
10,000 devices (``rx/<id>/command``), measured until every device has received its message.

The devices are raw MQTT 3.1.1 sockets in one selector loop in a child process (``python -m bench.rotation
devices PORT COUNT``), like the other benchmarks' holders: they subscribe to ``rx/<id>/#``, publish `status` on every
connect, PUBACK what they receive, answer `credentials` with an `ack` (fleetkeeper_device.protocol, the same
messages as the device library), keep the old secret until the new one is accepted, reconnect with the new secret
when the broker's reload drops them (falling back to the old one if it is refused), and report their counters on
stdout twice a second. At most 100 handshakes are in flight (Mosquitto's listen backlog is 100).

The fleet default policy's switch budget is raised for the run to 20,000 switches per minute: the default (6,000)
spreads 10,000 switches over two minutes on purpose (docs/rotation.md).
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

from security.detection.wire import connect_packet, publish_packet, subscribe_packet

from .broker import Broker, devices_create, fleet_only, record
from .processes import Consumer, Redis, Worker

PREFIX = "device-rot"
CANARY = 100
MAX_IN_FLIGHT = 100  # handshakes at once (the broker's listen backlog is 100)
ROOT = Path(__file__).resolve().parent.parent


def rot_client_id(n: int) -> str:
    return f"{PREFIX}{n:05d}"


def rot_secret(n: int) -> str:
    return f"rot-bench-secret-{n:05d}-0123456789abcdefghijklmnopq"


# --- the simulated devices (child process; no Django) ----------------------------------------------------------------


class _Device:
    __slots__ = ("n", "client_id", "secret", "new_secret", "trying_new", "sock", "buf", "out", "packet_id", "up")

    def __init__(self, n: int):
        self.n = n
        self.client_id = rot_client_id(n)
        self.secret = rot_secret(n)
        self.new_secret: str | None = None
        self.trying_new = False
        self.sock: socket.socket | None = None
        self.buf = bytearray()
        self.out = bytearray()
        self.packet_id = 0
        self.up = False

    def next_id(self) -> int:
        self.packet_id = self.packet_id % 65000 + 1
        return self.packet_id


class Fleet:
    """The device half for many devices in one selector loop."""

    def __init__(self, port: int, count: int, *, rx: str = "rx", tx: str = "tx"):
        from fleetkeeper_device import protocol

        self.protocol = protocol
        self.port, self.rx, self.tx = port, rx, tx
        self.devices = [_Device(n) for n in range(count)]
        self.selector = selectors.DefaultSelector()
        self.queue: deque[_Device] = deque(self.devices)
        self.in_flight = 0
        self.boot = time.time()
        self.stats = {
            "connected": 0,
            "plain": 0,
            "credentials": 0,
            "acks": 0,
            "reconnected_new": 0,
            "refused_new": 0,
            "refused": 0,
            "drops": 0,
            "connect_errors": 0,
        }

    # connections
    def _open(self, device: _Device) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.connect_ex(("127.0.0.1", self.port))
        device.sock, device.buf, device.out = sock, bytearray(), bytearray()
        password = device.new_secret if device.trying_new else device.secret
        device.out += connect_packet(
            client_id=device.client_id, username=device.client_id, password=password, keepalive=240
        )
        self.selector.register(sock, selectors.EVENT_WRITE, device)
        self.in_flight += 1

    def _close(self, device: _Device, *, handshake: bool) -> None:
        if device.sock is not None:
            try:
                self.selector.unregister(device.sock)
            except (KeyError, ValueError):
                pass
            device.sock.close()
            device.sock = None
        if handshake:
            self.in_flight -= 1
        if device.up:
            device.up = False
            self.stats["connected"] -= 1

    def _send(self, device: _Device, data: bytes) -> None:
        if device.sock is None:
            return
        if device.out:
            device.out += data
            return
        try:
            sent = device.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            return
        if sent < len(data):
            device.out += data[sent:]
            self.selector.modify(device.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, device)

    def _flush(self, device: _Device) -> None:
        try:
            sent = device.sock.send(device.out)
        except BlockingIOError:
            return
        del device.out[:sent]
        if not device.out:
            self.selector.modify(device.sock, selectors.EVENT_READ, device)

    # MQTT
    def _on_connack(self, device: _Device, code: int) -> None:
        self.in_flight -= 1
        if code != 0:
            self._close(device, handshake=False)
            if device.trying_new:  # the broker does not take the new secret (yet): the old one
                self.stats["refused_new"] += 1
                device.trying_new = False
                self.queue.append(device)
            else:
                self.stats["refused"] += 1
            return
        if device.trying_new:
            device.secret, device.new_secret, device.trying_new = device.new_secret, None, False
            self.stats["reconnected_new"] += 1
        device.up = True
        self.stats["connected"] += 1
        now = time.time()
        status = self.protocol.encode(
            "status",
            id=f"s{device.n}-{device.next_id()}",
            ts=round(now, 3),
            firmware="1.0.0",
            boot_time=round(self.boot, 3),
            uptime=round(now - self.boot, 3),
        )
        self._send(
            device,
            subscribe_packet(device.next_id(), [(f"{self.rx}/{device.client_id}/#", 1)])
            + publish_packet(f"{self.tx}/{device.client_id}/status", status, qos=1, packet_id=device.next_id()),
        )

    def _on_publish(self, device: _Device, flags: int, body: bytes) -> None:
        topic_length = int.from_bytes(body[0:2], "big")
        topic = body[2 : 2 + topic_length].decode()
        at = 2 + topic_length
        if flags & 0x06:
            packet_id = body[at : at + 2]
            at += 2
            self._send(device, b"\x40\x02" + packet_id)
        payload = bytes(body[at:])
        if not topic.endswith("/credentials"):
            self.stats["plain"] += 1
            return
        message = self.protocol.decode(payload, channel="credentials")
        if message["type"] != "credentials":
            return
        self.stats["credentials"] += 1
        device.new_secret = message["secret"]  # kept with the old one until the broker takes it
        ack = self.protocol.encode(
            "ack", id=message["id"], ts=round(time.time(), 3), command="credentials", status="ok"
        )
        self._send(device, publish_packet(f"{self.tx}/{device.client_id}/ack", ack, qos=1, packet_id=device.next_id()))
        self.stats["acks"] += 1

    def _on_readable(self, device: _Device) -> None:
        try:
            data = device.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._dropped(device)
            return
        buf = device.buf
        buf += data
        while len(buf) >= 2:
            multiplier, length, at = 1, 0, 1
            while True:
                if at >= len(buf):
                    return
                byte = buf[at]
                length += (byte & 0x7F) * multiplier
                multiplier *= 128
                at += 1
                if not byte & 0x80:
                    break
            if len(buf) < at + length:
                return
            kind, body = buf[0], bytes(buf[at : at + length])
            del buf[: at + length]
            if kind == 0x20:
                self._on_connack(device, body[1])
                if device.sock is None:
                    return
            elif kind & 0xF0 == 0x30:
                self._on_publish(device, kind & 0x0F, body)

    def _dropped(self, device: _Device) -> None:
        handshake = not device.up
        self._close(device, handshake=handshake)
        if device.new_secret is not None:
            device.trying_new = True  # the reload dropped us: the switch; come back with the new secret
        else:
            self.stats["drops"] += 1
        self.queue.append(device)

    def run(self, *, report_every: float = 0.5) -> None:
        stdin = sys.stdin
        os.set_blocking(stdin.fileno(), False)
        self.selector.register(stdin, selectors.EVENT_READ, None)
        next_report = time.monotonic()
        ready_said = False
        while True:
            while self.queue and self.in_flight < MAX_IN_FLIGHT:
                self._open(self.queue.popleft())
            for key, events in self.selector.select(timeout=0.1):
                device = key.data
                if device is None:
                    line = stdin.read()
                    if not line or "quit" in line:
                        return
                    continue
                if device.sock is None:
                    continue
                if events & selectors.EVENT_WRITE:
                    if not device.up and device.out and device.sock is not None:
                        error = device.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        if error:  # refused at TCP (backlog): try again
                            self.stats["connect_errors"] += 1
                            self._close(device, handshake=True)
                            self.queue.append(device)
                            continue
                    self._flush(device)
                if events & selectors.EVENT_READ and device.sock is not None:
                    self._on_readable(device)
            now = time.monotonic()
            if now >= next_report:
                next_report = now + report_every
                if not ready_said and self.stats["connected"] == len(self.devices):
                    ready_said = True
                    print("ready", flush=True)
                print("stats " + json.dumps(self.stats), flush=True)


def devices_main() -> None:
    """`python -m bench.rotation devices PORT COUNT [RX TX]`."""
    port, count = int(sys.argv[2]), int(sys.argv[3])
    rx, tx = (sys.argv[4], sys.argv[5]) if len(sys.argv) > 5 else ("rx", "tx")
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count + 1000:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count + 1000), hard))
    Fleet(port, count, rx=rx, tx=tx).run()


class DeviceProcess:
    def __init__(self, port: int, count: int):
        from django.conf import settings

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.rotation", "devices", str(port), str(count)]
            + [settings.MQTT_TOPIC_RX_PREFIX, settings.MQTT_TOPIC_TX_PREFIX],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.stats: dict = {}
        self.ready = False

    def poll(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                break
            if line.startswith("stats "):
                self.stats = json.loads(line[6:])
            elif line.strip() == "ready":
                self.ready = True
        if self.proc.poll() is not None:
            raise RuntimeError(f"the simulated devices exited with {self.proc.returncode}")
        return self.stats

    def stop(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


# --- the console side (parent) -----------------------------------------------------------------------------------


def create_fleet(total: int, iterations: int) -> None:
    """Exactly ``total`` devices with secrets on the broker: this benchmark's own, with credentials 120 days old (due
    for rotation); every other device is decommissioned (it stays in the table, off the broker)."""
    import datetime

    from django.utils import timezone

    issued = timezone.now() - datetime.timedelta(days=120)
    devices_create(
        fleet_only(PREFIX), total, iterations=iterations, name=rot_client_id, secret=rot_secret, issued_at=issued
    )


def _wait(predicate, *, timeout: float, what: str, progress=None, every: float = 1.0, since: float | None = None):
    """Seconds until ``predicate()``; progress lines show the time since ``since`` (default: now)."""
    started = time.monotonic()
    since = started if since is None else since
    next_line = started + every
    while not predicate():
        now = time.monotonic()
        if now - started > timeout:
            raise TimeoutError(f"{what}: not done after {timeout:.0f} s")
        if progress is not None and now >= next_line:
            next_line = now + every
            print(f"    {now - since:5.1f} s  {progress()}", flush=True)
        time.sleep(0.05)
    return time.monotonic() - started


def _consumer_ready(port: int) -> None:
    """Until the consumer records a status from the first device: it is subscribed and writing."""
    import paho.mqtt.client as mqtt

    from fleetkeeper_device import protocol
    from security.models import DeviceActivity

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=rot_client_id(0), protocol=mqtt.MQTTv311)
    client.username_pw_set(rot_client_id(0), rot_secret(0))
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        started = time.monotonic()
        while not DeviceActivity.objects.filter(client_id=rot_client_id(0), last_status_at__isnull=False).exists():
            if time.monotonic() - started > 60:
                raise TimeoutError("the consumer did not record a status within 60 s")
            now = time.time()
            status = protocol.encode("status", id=f"probe-{now}", ts=now, firmware="1.0.0", boot_time=now, uptime=0.0)
            client.publish(f"tx/{rot_client_id(0)}/status", status, qos=1)
            time.sleep(0.5)
    finally:
        client.disconnect()
        client.loop_stop()


def _counts(campaign_id: int) -> dict:
    from django.db.models import Count, Q

    from security.models import CredentialRotation

    return CredentialRotation.objects.filter(campaign_id=campaign_id).aggregate(
        issued=Count("id"),
        delivered=Count("id", filter=Q(delivered_at__isnull=False)),
        confirmed=Count("id", filter=Q(confirmed_at__isnull=False)),
        switched=Count("id", filter=Q(switched_at__isnull=False)),
        completed=Count("id", filter=Q(state="completed")),
        failed=Count("id", filter=Q(state__in=["failed", "cancelled"])),
    )


def bench_rotation(*, devices: int, operator) -> None:
    from django.conf import settings

    from fleetkeeper_device import protocol
    from security.brokers import broker_config, get_adapter
    from security.models import RotationCampaign
    from security.rotation import campaigns, commander
    from security.rotation.policies import rotation_defaults_ensure
    from security.services import enforcement_apply, policy_desired

    print(f"\n[rotation] {devices:,} devices with secrets, all connected as simulated devices", flush=True)
    cfg = broker_config()
    create_fleet(devices, settings.MQTT_PASSWORD_ITERATIONS)
    policy = rotation_defaults_ensure()
    policy.switches_per_minute = 20_000
    policy.save(update_fields=["switches_per_minute", "updated"])
    get_adapter().write(policy_desired())
    broker = Broker(cfg)
    broker.start()
    enforcement_apply(coalesce=False)
    consumer = Consumer(settings.REDIS_URL)
    _consumer_ready(cfg.port)
    fleet = DeviceProcess(cfg.port, devices)
    try:
        took = _wait(
            lambda: fleet.poll().get("connected", 0) >= devices,
            timeout=180,
            what="connecting the devices",
            progress=lambda: fleet.stats,
            every=5,
        )
        print(f"  {devices:,} devices connected in {took:.1f} s", flush=True)
        from devices.models import Device

        _wait(
            lambda: Device.objects.filter(client_id__startswith=PREFIX, last_seen__isnull=False).count() >= devices,
            timeout=120,
            what="the consumer seeing every device",
        )

        # Baseline: one plain QoS 1 message from the console's command identity to each device.
        plain_before = fleet.poll().get("plain", 0)
        started = time.monotonic()
        messages = [
            (
                f"{settings.MQTT_TOPIC_RX_PREFIX}/{rot_client_id(n)}/command",
                protocol.encode("command", id=f"bench-{n}", name="ping"),
            )
            for n in range(devices)
        ]
        for i in range(0, devices, settings.ROTATION_DELIVER_CHUNK):
            commander.publish(messages[i : i + settings.ROTATION_DELIVER_CHUNK])
        _wait(lambda: fleet.poll().get("plain", 0) - plain_before >= devices, timeout=120, what="plain delivery")
        baseline = time.monotonic() - started
        print(f"  baseline: {devices:,} plain messages delivered in {baseline:.2f} s", flush=True)

        # The rotation: a campaign over every device, a canary first.
        started = time.monotonic()
        campaign = campaigns.campaign_create(
            actor=operator,
            name="bench",
            filters={"search": PREFIX},
            reason="benchmark",
            confirm_count=devices,
            options=campaigns.CampaignSettings(canary_size=CANARY, wave_size=devices, wave_timeout_seconds=300),
        )

        def progress() -> str:
            counts = _counts(campaign.pk)
            stats = fleet.poll()
            return (
                " ".join(f"{k} {v:,}" for k, v in counts.items())
                + f" | devices: acked {stats.get('acks', 0):,}, back with new secret "
                f"{stats.get('reconnected_new', 0):,}, refused new {stats.get('refused_new', 0):,}"
            )

        switched_in = _wait(
            lambda: _counts(campaign.pk)["switched"] >= devices,
            timeout=600,
            what="switching every device",
            progress=progress,
        )
        _wait(
            lambda: fleet.poll().get("reconnected_new", 0) >= devices,
            timeout=120,
            what="every device back with its new secret",
            progress=progress,
            since=started,
        )
        reconnected_in = time.monotonic() - started
        _wait(
            lambda: (
                RotationCampaign.objects.get(pk=campaign.pk).state
                in (RotationCampaign.State.COMPLETED, RotationCampaign.State.PAUSED)
            ),
            timeout=180,
            what="the campaign completing",
            progress=progress,
            since=started,
        )
        completed_in = time.monotonic() - started
        campaign.refresh_from_db()
        stats = fleet.poll()
        counts = _counts(campaign.pk)
        record(
            f"rotation: {devices:,} devices issued, delivered, confirmed and switched (campaign, canary {CANARY})",
            switched_in,
            "s",
            target=60,
            baseline=baseline,
            baseline_label=f"{devices:,} plain QoS 1 messages delivered",
            note=f"{switched_in / baseline:.1f}x the baseline",
        )
        record(
            f"rotation: {devices:,} devices back on the broker with their new secret (device side)",
            reconnected_in,
            "s",
            note=f"{stats.get('reconnected_new', 0):,} reconnected with the new secret, "
            f"{stats.get('refused_new', 0):,} refusals of a new secret, {stats.get('refused', 0):,} other refusals",
        )
        record(
            f"rotation: campaign completed ({devices:,} reconnects proven to the console)",
            completed_in,
            "s",
            note=f"state {campaign.state}; {counts['completed']:,} completed, {counts['failed']:,} failed"
            + (f"; {campaign.pause_reason}" if campaign.pause_reason else ""),
        )
    finally:
        fleet.stop()
        consumer.stop()
        broker.stop()


def run(*, devices: int) -> None:
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Group

    from fleet.celery import app
    from security.brokers import broker_config

    redis = Redis()
    settings.REDIS_URL = settings.CELERY_BROKER_URL = redis.url
    app.conf.broker_url = redis.url
    Path(broker_config().broker_dir).mkdir(parents=True, exist_ok=True)
    operator, _ = get_user_model().objects.get_or_create(username="bench-operator")
    operator.groups.add(Group.objects.get(name="operator"))
    worker = Worker(redis.url)
    try:
        bench_rotation(devices=devices, operator=operator)
    finally:
        worker.stop()
        redis.stop()


if __name__ == "__main__" and sys.argv[1:2] == ["devices"]:
    devices_main()
