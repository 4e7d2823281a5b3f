"""Broker figures (design.md, "Performance targets"):

1. policy load: 100,000 devices rendered, written and loaded by Mosquitto (target < 5 s), against an empty fleet;
2. reload stall: a probe's round trip while the broker reloads with 10,000 devices and 2,000 connected
   (target < 500 ms), against the same probe with no reload;
3. reconnect: 10,000 devices reconnecting after a broker restart (target < 10 s), against connecting them to a
   broker that was already running.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import threading
import time
from pathlib import Path

from .mqtt_raw import close_all, connect_many

RESULTS: list[dict] = []


def record(
    name: str,
    value: float,
    unit: str,
    *,
    target: float | None = None,
    baseline: float | None = None,
    baseline_label: str = "",
    note: str = "",
    at_least: float | None = None,
) -> None:
    """``target``: the value must stay under it; ``at_least``: the value must reach it (more is better)."""
    verdict = "" if target is None else ("PASS" if value < target else "FAIL")
    if at_least is not None:
        verdict = "PASS" if value >= at_least else "FAIL"
    RESULTS.append(
        {
            "name": name,
            "value": value,
            "unit": unit,
            "target": target,
            "baseline": baseline,
            "baseline_label": baseline_label,
            "verdict": verdict,
            "note": note,
        }
    )
    line = f"  {name}: {value:.3f} {unit}"
    if target is not None:
        line += f" (target < {target} {unit}: {verdict})"
    if at_least is not None:
        line += f" (target >= {at_least} {unit}: {verdict})"
    if baseline is not None:
        line += f"; baseline {baseline_label}: {baseline:.3f} {unit}"
    if note:
        line += f" — {note}"
    print(line, flush=True)


# --- the broker process -----------------------------------------------------------------------------------


class Broker:
    def __init__(self, cfg):
        import atexit

        self.cfg = cfg
        self.proc: subprocess.Popen | None = None
        atexit.register(self.stop)  # a failed run must not leave a broker behind

    def start(self) -> float:
        """Start and return the time until the port accepts connections."""
        import socket

        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        log = open(Path(self.cfg.broker_dir) / "mosquitto.log", "a")  # noqa: SIM115
        started = time.monotonic()
        self.proc = subprocess.Popen([binary, "-c", self.cfg.config_file], stdout=log, stderr=subprocess.STDOUT)
        Path(self.cfg.pid_file).write_text(f"{self.proc.pid}\n")
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("mosquitto exited: see " + str(Path(self.cfg.broker_dir) / "mosquitto.log"))
            try:
                with socket.create_connection((self.cfg.host, self.cfg.port), timeout=0.2):
                    return time.monotonic() - started
            except OSError:
                time.sleep(0.005)

    def cpu_seconds(self) -> float:
        """User + system CPU time the broker has used (from /proc): independent of what else the machine runs."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def wait_for_login(cfg, username: str, password: str, timeout: float = 30.0) -> float:
    """Seconds until this credential is accepted (it is the last line of the file: the file has been loaded)."""
    from security.brokers.mqtt_client import connect_code

    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if connect_code(cfg.host, cfg.port, username=username, password=password, timeout=2) == 0:
            return time.monotonic() - started
        time.sleep(0.002)
    raise TimeoutError(f"{username} was never accepted")


# --- fleet fixtures ---------------------------------------------------------------------------------------


def secret_for(n: int) -> str:
    return f"bench-secret-{n:06d}-0123456789abcdefghijklmnopqrstuv"


def client_id(n: int) -> str:
    return f"device-{n:06d}"


def create_fleet(start: int, stop: int, iterations: int) -> None:
    devices_create(start, stop, iterations=iterations, name=client_id, secret=secret_for)


def devices_create(start: int, stop: int, *, iterations: int, name, secret, issued_at=None) -> None:
    """Devices ``name(n)`` for n in [start, stop), each with the broker secret ``secret(n)``, in bulk (10,000 per
    round): what every benchmark's fleet is made of. ``issued_at`` (default now) dates their credentials."""
    from django.utils import timezone

    from devices.models import Device
    from security.enforcement.secrets import hash_secret
    from security.models import DeviceCredential

    issued_at = issued_at or timezone.now()
    for chunk in range(start, stop, 10_000):
        end = min(stop, chunk + 10_000)
        Device.objects.bulk_create([Device(client_id=name(n)) for n in range(chunk, end)], batch_size=5000)
        pks = dict(
            Device.objects.filter(client_id__gte=name(chunk), client_id__lte=name(end - 1)).values_list(
                "client_id", "pk"
            )
        )
        DeviceCredential.objects.bulk_create(
            [
                DeviceCredential(
                    device_id=pks[name(n)],
                    password_hash=hash_secret(secret(n), iterations=iterations),
                    issued_at=issued_at,
                )
                for n in range(chunk, end)
            ],
            batch_size=5000,
        )


def fleet_only(prefix: str) -> int:
    """Decommission every device outside ``prefix`` (they stay in the table, off the broker policy), so a benchmark
    measures its own fleet; returns how many of its own devices exist already."""
    from devices.models import Device

    Device.objects.exclude(client_id__startswith=prefix).exclude(status="decommissioned").update(
        status="decommissioned"
    )
    return Device.objects.filter(client_id__startswith=prefix).count()


def revoke_quietly(n: int) -> None:
    """What device_revoke does to the data (the bench measures the broker, not the audit log)."""
    from devices.models import Device
    from security.models import DeviceCredential

    Device.objects.filter(client_id=client_id(n)).update(status="revoked")
    DeviceCredential.objects.filter(device__client_id=client_id(n)).delete()


# --- 1. policy load at 100,000 --------------------------------------------------------------------------------


def bench_policy_load(cfg, adapter, total: int) -> None:
    from security.services import policy_desired

    print(f"\n[1] policy load: {total:,} devices rendered, written and loaded", flush=True)
    # Baseline: the same path with an empty fleet (only the console identities): what a broker start and a login
    # cost by themselves.
    from django.conf import settings

    from security.brokers import console_identities
    from security.brokers.render import policy_render

    broker = Broker(cfg)
    policy_desired()  # warm up (imports, database caches) so both runs measure the same work
    started = time.monotonic()
    adapter.write(policy_render(cfg=cfg, devices=[], console=console_identities()))
    broker.start()
    wait_for_login(cfg, settings.MQTT_CONSUMER_USERNAME, settings.MQTT_CONSUMER_PASSWORD)
    baseline = time.monotonic() - started
    broker.stop()

    # Cold: render from the database, write atomically, start the broker, the last device logs in.
    started = time.monotonic()
    policy = policy_desired()
    rendered = time.monotonic() - started
    adapter.write(policy)
    written = time.monotonic() - started
    broker.start()
    wait_for_login(cfg, client_id(total - 1), secret_for(total - 1))
    total_time = time.monotonic() - started
    record(
        f"render + write + load {total:,} devices (cold start)",
        total_time,
        "s",
        target=5.0,
        baseline=baseline,
        baseline_label="same path with 0 devices",
        note=f"render {rendered:.2f} s, write {written - rendered:.2f} s, broker load {total_time - written:.2f} s",
    )
    # Live: one revocation applied to the running broker at this size (render, write, SIGHUP, canary probe).
    revoke_quietly(0)
    started = time.monotonic()
    policy = policy_desired()
    rendered = time.monotonic() - started
    result = adapter.apply(policy)
    applied = time.monotonic() - started
    assert result.probe.ok, result.probe
    record(
        f"apply one revocation at {total:,} devices (render, write, reload, probe verified)",
        applied,
        "s",
        note=f"render {rendered:.2f} s, write+reload+probe {applied - rendered:.2f} s",
    )
    broker.stop()


# --- 2. reload stall with 10,000 devices and 2,000 connected -------------------------------------------------


class RoundTripProbe:
    """The consumer sends a command to one device; the round trip is the time until the device receives it."""

    def __init__(self, cfg, settings, device_n: int):
        import paho.mqtt.client as mqtt

        self.received = threading.Event()
        self.device = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id(device_n))
        self.device.username_pw_set(client_id(device_n), secret_for(device_n))
        self.device.on_message = lambda *_: self.received.set()
        self.device.connect(cfg.host, cfg.port, keepalive=60)
        self.device.subscribe(f"{cfg.rx_prefix}/{client_id(device_n)}/#", qos=0)
        self.device.loop_start()
        self.console = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=settings.MQTT_CONSUMER_USERNAME)
        self.console.username_pw_set(settings.MQTT_CONSUMER_USERNAME, settings.MQTT_CONSUMER_PASSWORD)
        self.console.connect(cfg.host, cfg.port, keepalive=60)
        self.console.loop_start()
        self.topic = f"{cfg.rx_prefix}/{client_id(device_n)}/command"
        time.sleep(0.3)

    def round_trip(self, timeout: float = 10.0) -> float:
        self.received.clear()
        started = time.monotonic()
        self.console.publish(self.topic, b"ping", qos=0)
        if not self.received.wait(timeout):
            return timeout
        return time.monotonic() - started

    def sample(self, seconds: float) -> list[float]:
        samples = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            samples.append(self.round_trip())
            time.sleep(0.002)
        return samples

    def close(self) -> None:
        for client in (self.device, self.console):
            client.disconnect()
            client.loop_stop()


def bench_reload_stall(cfg, adapter, fleet: int, connected: int, reloads: int = 5) -> None:
    from django.conf import settings

    from security.services import policy_desired

    print(f"\n[2] reload stall: {fleet:,} devices, {connected:,} connected, {reloads} reloads", flush=True)
    broker = Broker(cfg)
    adapter.write(policy_desired())
    broker.start()
    import sys

    holder = subprocess.Popen(
        [sys.executable, "-m", "bench.hold", str(cfg.port), "0", str(connected)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    ok, refused = (int(v) for v in holder.stdout.readline().split()[1:3])
    assert ok == connected, f"only {ok} of {connected} connected ({refused} refused)"
    probe = RoundTripProbe(cfg, settings, fleet - 1)
    try:
        baseline = probe.sample(2.0)
        stalls = []
        apply_times = []
        for i in range(reloads):
            revoke_quietly(fleet - 2 - i)  # a device that is not connected: the files change, nobody else drops
            samples: list[float] = []
            stop = threading.Event()

            def sampler(samples=samples, stop=stop):
                while not stop.is_set():
                    samples.append(probe.round_trip())
                    time.sleep(0.001)

            thread = threading.Thread(target=sampler)
            thread.start()
            time.sleep(0.05)
            started = time.monotonic()
            result = adapter.apply(policy_desired())
            apply_times.append(time.monotonic() - started)
            time.sleep(0.3)
            stop.set()
            thread.join()
            assert result.probe.ok, result.probe
            stalls.append(max(samples))
        holder.stdin.write("check\n")
        holder.stdin.flush()
        dropped = int(holder.stdout.readline().split()[1])
        record(
            f"worst probe round trip during a reload ({fleet:,} devices, {connected:,} connected)",
            max(stalls) * 1000,
            "ms",
            target=500,
            baseline=max(baseline) * 1000,
            baseline_label=f"worst round trip without reload (median {statistics.median(baseline) * 1000:.2f} ms)",
            note=f"per reload: {', '.join(f'{s * 1000:.0f}' for s in stalls)} ms; "
            f"{dropped} of {connected:,} connected devices dropped by the reloads",
        )
        record(
            f"apply a revocation at {fleet:,} devices with {connected:,} connected (render, write, reload, probe)",
            statistics.median(apply_times) * 1000,
            "ms",
            note=f"median of {reloads}; max {max(apply_times) * 1000:.0f} ms",
        )
    finally:
        probe.close()
        holder.stdin.close()
        holder.wait(timeout=30)
        broker.stop()


# --- 3. reconnect after a restart ------------------------------------------------------------------------------


def bench_reconnect(cfg, adapter, fleet: int, label: str = "") -> None:
    from security.services import policy_desired

    print(f"\n[3] reconnect: {fleet:,} devices after a broker restart{label}", flush=True)
    broker = Broker(cfg)
    adapter.write(policy_desired())
    broker.start()
    creds = [(client_id(n), secret_for(n)) for n in range(fleet) if n not in range(fleet - 10, fleet)]
    baseline = connect_many(cfg.port, creds, timeout=300)
    assert baseline.refused == 0, baseline
    broker.stop()
    close_all(baseline.sockets)
    listening = broker.start()
    cpu_before = broker.cpu_seconds()
    again = connect_many(cfg.port, creds, timeout=300)
    cpu = broker.cpu_seconds() - cpu_before
    record(
        f"reconnect {len(creds):,} devices after a restart{label}",
        again.elapsed,
        "s",
        target=10.0,
        baseline=baseline.elapsed,
        baseline_label="connecting them to a broker already running",
        note=f"{again.ok:,} accepted, {again.refused} refused; broker CPU {cpu:.2f} s; "
        f"broker listening {listening:.2f} s after start",
    )
    close_all(again.sockets)
    broker.stop()


def run(*, devices: int, stall_fleet: int, connected: int, reconnect_fleet: int, compare_iterations: int) -> list:
    from django.conf import settings

    from security.brokers import broker_config, get_adapter

    cfg = broker_config()
    adapter = get_adapter()
    Path(cfg.broker_dir).mkdir(parents=True, exist_ok=True)
    iterations = settings.MQTT_PASSWORD_ITERATIONS
    print(f"Mosquitto on {cfg.host}:{cfg.port}, files in {cfg.broker_dir}; PBKDF2 iterations {iterations}", flush=True)
    first = max(stall_fleet, reconnect_fleet)
    started = time.monotonic()
    create_fleet(0, first, iterations)
    print(f"(fixture: {first:,} devices with credentials in {time.monotonic() - started:.1f} s)", flush=True)
    bench_reload_stall(cfg, adapter, stall_fleet, connected)
    bench_reconnect(cfg, adapter, reconnect_fleet)
    if compare_iterations:
        # The same reconnect with mosquitto_passwd's default cost, to show what the iteration count decides.
        from security.enforcement.secrets import hash_secret
        from security.models import DeviceCredential

        for cred in DeviceCredential.objects.select_related("device").filter(
            device__client_id__lt=client_id(compare_iterations)
        ):
            n = int(cred.device.client_id.split("-")[1])
            cred.password_hash = hash_secret(secret_for(n), iterations=101)
            cred.save(update_fields=["password_hash"])
        bench_reconnect(cfg, adapter, compare_iterations, label=" (101 iterations, for comparison)")
        for cred in DeviceCredential.objects.select_related("device").filter(
            device__client_id__lt=client_id(compare_iterations)
        ):
            n = int(cred.device.client_id.split("-")[1])
            cred.password_hash = hash_secret(secret_for(n), iterations=iterations)
            cred.save(update_fields=["password_hash"])
        from devices.models import Device

        Device.objects.filter(status="revoked").update(status="active")
    if devices > first:
        started = time.monotonic()
        create_fleet(first, devices, iterations)
        print(f"(fixture: {devices - first:,} more devices in {time.monotonic() - started:.1f} s)", flush=True)
    bench_policy_load(cfg, adapter, devices)
    os.environ.get("FLEET_BENCH_KEEP") or shutil.rmtree(cfg.broker_dir, ignore_errors=True)
    return RESULTS
