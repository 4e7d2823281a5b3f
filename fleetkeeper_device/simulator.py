"""A fleet simulator built on the device library: N devices with real MQTT connections, K of them hostile.

Each honest device has its own telemetry shape (temperature, battery, signal) and rhythm, reports its
firmware on connect, and answers console commands through DeviceClient. Hostile devices (hostile.py)
also attack. Every device is driven from one selector loop (reactor.py), no thread per device, so one
process holds thousands of connections.

Plain CLI (no Django needed), given the devices' credentials in a file::

    python -m fleetkeeper_device.simulator --port 18830 --credentials creds.json --hostile 2 --rate 0.5

With the console's database, ``manage.py simulate --devices 50 --hostile 3`` issues the credentials itself.
Prints one summary line per second; Ctrl-C or SIGTERM stops cleanly (MQTT DISCONNECT for every device).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import random
import resource
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TextIO

from .backoff import Backoff
from .client import DeviceClient, DeviceEvents
from .hostile import ATTACKS, HostileAgent
from .reactor import Reactor
from .tls import TLSContextFactory
from .topics import DEFAULT_SCHEME, TopicScheme


@dataclass(frozen=True)
class DeviceSpec:
    client_id: str
    secret: str
    firmware: str = "1.0.0"
    model: str | None = None
    hostile: bool = False
    payload_key: str | None = None  # fkpk1.<...>: the device seals what it publishes (docs/device-protocol.md)


def choose_hostile(specs: Sequence[DeviceSpec], count: int, rng: random.Random) -> list[DeviceSpec]:
    """Mark ``count`` devices, chosen at random, as hostile."""
    if count > len(specs):
        raise ValueError(f"cannot make {count} of {len(specs)} devices hostile")
    chosen = set(rng.sample(range(len(specs)), count))
    return [replace(s, hostile=i in chosen) for i, s in enumerate(specs)]


class Sensors:
    """One device's telemetry shape: a slow temperature cycle with noise, a battery that drains and is
    recharged, a radio signal that wanders. Parameters differ per device so baselines differ too."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.temperature_base = rng.uniform(12.0, 32.0)
        self.temperature_swing = rng.uniform(0.5, 5.0)
        self.temperature_period = rng.uniform(300.0, 3600.0)
        self.temperature_noise = rng.uniform(0.05, 0.5)
        self.phase = rng.uniform(0.0, 2 * math.pi)
        self.mains_powered = rng.random() < 0.2
        self.battery = rng.uniform(35.0, 100.0)
        self.drain = rng.uniform(0.002, 0.05)
        self.signal_base = rng.uniform(-95.0, -50.0)
        self.signal_noise = rng.uniform(0.5, 6.0)

    def read(self, now: float) -> dict[str, float]:
        gauss = self.rng.gauss
        values = {
            "temperature": round(
                self.temperature_base
                + self.temperature_swing * math.sin(2 * math.pi * now / self.temperature_period + self.phase)
                + gauss(0.0, self.temperature_noise),
                2,
            ),
            "signal": round(self.signal_base + gauss(0.0, self.signal_noise)),
        }
        if not self.mains_powered:
            self.battery -= self.drain
            if self.battery < 5.0:
                self.battery = 100.0  # someone changed the batteries
            values["battery"] = round(self.battery, 1)
        return values


class _Events(DeviceEvents):
    def __init__(self, simulation: Simulation):
        self.sim = simulation

    def connected(self, device, slot):
        self.sim.totals["connects"] += 1
        self.sim.totals["messages"] += 1  # the status message sent on every connect
        agent = self.sim.agents.get(device.client_id)
        if agent is not None:
            agent.on_connected()

    def refused(self, device, reason, slot):
        self.sim.totals["refused"] += 1
        self.sim.totals["refused_connect"] += 1

    def connect_failed(self, device, error):
        self.sim.totals["connect_errors"] += 1

    def disconnected(self, device, reason_code, reason):
        self.sim.totals["disconnects"] += 1
        agent = self.sim.agents.get(device.client_id)
        if agent is not None:
            agent.on_disconnected(reason_code)
        elif reason_code == 142:
            self.sim.totals["honest_taken_over"] += 1

    def unexpected_message(self, device, topic, payload):
        agent = self.sim.agents.get(device.client_id)
        if agent is not None:
            agent.on_unexpected_message(topic)
        else:
            self.sim.totals["unexpected"] += 1

    def acked(self, device, message_id, command, status):
        self.sim.totals["acks"] += 1
        self.sim.totals["messages"] += 1


class _HostileEvents(_Events):
    """Only hostile devices listen to publish results: paho's per-publish callback is not free."""

    def published(self, device, mid, reason_code):
        self.sim.agents[device.client_id].on_published(mid, reason_code)

    def subscribed(self, device, mid, reason_codes):
        self.sim.agents[device.client_id].on_subscribed(reason_codes)


def raise_open_file_limit() -> int:
    """Each device is a socket; lift the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Simulation:
    def __init__(
        self,
        specs: Sequence[DeviceSpec],
        *,
        host: str,
        port: int,
        rate: float = 0.2,
        duration: float | None = None,
        connect_rate: float = 200.0,
        max_packet_size: int = 64 * 1024,
        topic_scheme: TopicScheme = DEFAULT_SCHEME,
        tls: TLSContextFactory | None = None,
        mqtt_version: str = "5",
        keepalive: int = 60,
        seed: int | None = None,
        out: TextIO | None = None,
        summary_interval: float = 1.0,
        hostile_interval: float = 1.0,
        flood_burst: int = 200,
        attacks: Sequence[str] = ATTACKS,
    ):
        if rate <= 0:
            raise ValueError("--rate must be above 0 (messages per second per device)")
        if not specs:
            raise ValueError("no devices to simulate")
        self.specs = list(specs)
        self.host, self.port = host, port
        self.rate = rate
        self.duration = duration
        self.connect_rate = max(1.0, connect_rate)
        self.max_packet_size = max_packet_size
        self.topics = topic_scheme
        self.tls = tls
        self.mqtt_version = mqtt_version
        self.keepalive = keepalive
        self.rng = random.Random(seed)
        self.out = out if out is not None else sys.stdout
        self.summary_interval = summary_interval
        self.hostile_interval = hostile_interval
        self.flood_burst = flood_burst
        self.attacks = tuple(attacks)
        self.reactor = Reactor()
        self.totals: Counter[str] = Counter()
        self.devices: list[DeviceClient] = []
        self.agents: dict[str, HostileAgent] = {}
        self._sensors: dict[str, Sensors] = {}
        self._stop_requested = threading.Event()
        self._started_at = 0.0
        self._last_messages = 0
        self._last_summary_at = 0.0
        self.max_connected = 0
        self.lines: list[str] = []

    # --- building
    def _build(self) -> None:
        events, hostile_events = _Events(self), _HostileEvents(self)
        for spec in self.specs:
            device = DeviceClient(
                spec.client_id,
                host=self.host,
                port=self.port,
                secret=spec.secret,
                firmware_version=spec.firmware,
                model=spec.model,
                topic_scheme=self.topics,
                tls=self.tls,
                # Hostile devices judge refusals by MQTT 5 reason codes (a 3.1.1 broker acks a denied publish).
                mqtt_version="5" if spec.hostile else self.mqtt_version,
                keepalive=self.keepalive,
                reactor=self.reactor,
                events=hostile_events if spec.hostile else events,
                backoff=Backoff(initial=0.5, maximum=30.0, rng=random.Random(self.rng.random())),
                stable_after=5.0,
                payload_key=spec.payload_key,
            )
            self.devices.append(device)
            self._sensors[spec.client_id] = Sensors(random.Random(self.rng.random()))
        honest = [d for d, s in zip(self.devices, self.specs, strict=True) if not s.hostile]
        for device, spec in zip(self.devices, self.specs, strict=True):
            if spec.hostile:
                self.agents[spec.client_id] = HostileAgent(
                    device,
                    secret=spec.secret,
                    victims=honest or self.devices,
                    reactor=self.reactor,
                    topic_scheme=self.topics,
                    totals=self.totals,
                    rng=random.Random(self.rng.random()),
                    interval=self.hostile_interval,
                    max_packet_size=self.max_packet_size,
                    flood_burst=self.flood_burst,
                    attacks=self.attacks,
                )

    def _start_devices(self, index: int = 0) -> None:
        if self._stop_requested.is_set():
            return
        batch = max(1, int(self.connect_rate / 10))
        for device in self.devices[index : index + batch]:
            device.start()
            interval = 1.0 / (self.rate * self.rng.uniform(0.6, 1.4))
            first = self.reactor.clock() + 0.2 + self.rng.uniform(0.0, interval)
            self.reactor.call_at(first, self._telemetry, device, interval, first)
            agent = self.agents.get(device.client_id)
            if agent is not None:
                agent.start()
        if index + batch < len(self.devices):
            self.reactor.call_later(0.1, self._start_devices, index + batch)

    def _telemetry(self, device: DeviceClient, interval: float, due: float) -> None:
        if self._stop_requested.is_set():
            return
        if device.connected:
            device.publish_telemetry(self._sensors[device.client_id].read(time.time()))
            self.totals["messages"] += 1
            self.totals["telemetry"] += 1
        # Keep the device's rhythm from when it was due, not from when the loop got to it (a busy machine
        # delays the loop by milliseconds); a device more than a second behind skips ahead instead of bursting.
        due = max(due + interval * self.rng.uniform(0.9, 1.1), self.reactor.clock() - max(interval, 1.0))
        self.reactor.call_at(due, self._telemetry, device, interval, due)

    # --- reporting
    def connected_count(self) -> int:
        return sum(1 for d in self.devices if d.connected)

    def _summary(self) -> None:
        if self._stop_requested.is_set():
            return
        now = time.monotonic()
        connected = self.connected_count()
        self.max_connected = max(self.max_connected, connected)
        messages = self.totals["messages"]
        elapsed = now - self._last_summary_at if self._last_summary_at else self.summary_interval
        per_second = (messages - self._last_messages) / elapsed if elapsed > 0 else 0.0
        self._last_messages, self._last_summary_at = messages, now
        line = (
            f"[{now - self._started_at:7.1f}s] connected {connected}/{len(self.devices)}"
            f" | messages {messages} (+{per_second:.0f}/s) | refused {self.totals['refused']}"
            f" | acks {self.totals['acks']}"
        )
        if self.totals["connect_errors"] and not connected:
            line += f" | cannot reach {self.host}:{self.port} ({self.totals['connect_errors']} attempts failed)"
        if self.agents:
            line += (
                f" | hostile {len(self.agents)}: attempts {self.totals['hostile_attempts']},"
                f" leaked {self.totals['leaked']}, breaches {self.totals['breaches']}"
            )
        self.lines.append(line)
        self.out.write(line + "\n")
        with contextlib.suppress(Exception):
            self.out.flush()
        if not self._stop_requested.is_set():
            self.reactor.call_later(self.summary_interval, self._summary)

    def summary(self) -> dict:
        elapsed = max(1e-9, (self._stopped_at or time.monotonic()) - self._started_at)
        attempts = Counter()
        for agent in self.agents.values():
            attempts.update(agent.stats)
        return {
            "devices": len(self.devices),
            "hostile": sorted(self.agents),
            "seconds": round(elapsed, 2),
            "connected_at_end": self._connected_at_end,
            "max_connected": self.max_connected,
            "messages": self.totals["messages"],
            "telemetry": self.totals["telemetry"],
            "messages_per_second": round(self.totals["messages"] / elapsed, 1),
            "refused": self.totals["refused"],
            "refused_connect": self.totals["refused_connect"],
            "acks": self.totals["acks"],
            "leaked": self.totals["leaked"],
            "breaches": self.totals["breaches"],
            "honest_taken_over": self.totals["honest_taken_over"],
            "hostile_stats": dict(sorted(attempts.items())),
            "breach_log": [line for agent in self.agents.values() for line in agent.log][:50],
        }

    # --- running
    def stop(self) -> None:
        """Stop from any thread or a signal handler."""
        self._stop_requested.set()
        self.reactor.stop()

    def run(self) -> dict:
        raise_open_file_limit()
        self._build()
        self._stopped_at: float | None = None
        self._connected_at_end = 0
        self._started_at = time.monotonic()
        restore = self._install_signal_handlers()
        try:
            self.reactor.call_later(0, self._start_devices, 0)
            self.reactor.call_later(self.summary_interval, self._summary)
            until = None if not self.duration else self.reactor.clock() + self.duration
            if not self._stop_requested.is_set():
                self.reactor.run(until=until)
            self._stop_requested.set()
            self._stopped_at = time.monotonic()
            self._connected_at_end = self.connected_count()
            self.max_connected = max(self.max_connected, self._connected_at_end)
            for agent in self.agents.values():
                agent.stop()
            for device in self.devices:
                device.stop()
            # Let the DISCONNECTs go out.
            deadline = self.reactor.clock() + 2.0
            while any(d.mqtt is not None and d.mqtt.socket() is not None for d in self.devices):
                if self.reactor.clock() >= deadline:
                    break
                self.reactor.run(until=min(deadline, self.reactor.clock() + 0.1))
        finally:
            restore()
            self.reactor.close()
        result = self.summary()
        self.out.write(
            f"stopped after {result['seconds']}s: {result['connected_at_end']} connected at the end,"
            f" {result['messages']} messages ({result['messages_per_second']}/s), {result['refused']} refused,"
            f" {result['leaked']} leaked, {result['breaches']} breaches\n"
        )
        return result

    def _install_signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, frame):
            self.stop()
            for sig, old in previous.items():  # a second Ctrl-C is not polite
                signal.signal(sig, old)

        for sig in previous:
            signal.signal(sig, handler)

        def restore():
            for sig, old in previous.items():
                signal.signal(sig, old)

        return restore


# --- the plain CLI --------------------------------------------------------------------------------------


def load_credentials(source: str | Path | TextIO) -> list[DeviceSpec]:
    """Credentials from JSON (a list of ``{"client_id"|"username", "password"|"secret", "firmware"?,
    "payload_key"?}``, the shape the console's credentials API returns, or an object ``{client_id: secret}``) or
    CSV (``client_id,secret[,firmware]``). A ``payload_key`` (``fkpk1.…``, from the payload-key API) makes the
    device seal what it publishes."""
    if isinstance(source, str | Path):
        text = sys.stdin.read() if str(source) == "-" else Path(source).read_text()
    else:
        text = source.read()
    stripped = text.lstrip()
    specs: list[DeviceSpec] = []
    if stripped.startswith(("[", "{")):
        data = json.loads(text)
        if isinstance(data, dict):
            data = [{"client_id": k, "secret": v} for k, v in data.items()]
        for number, item in enumerate(data, 1):
            client_id = item.get("client_id") or item.get("username")
            secret = item.get("secret") or item.get("password")
            if not client_id or not secret:
                raise ValueError(f"entry {number} needs client_id (or username) and password (or secret)")
            specs.append(
                DeviceSpec(
                    client_id,
                    secret,
                    firmware=item.get("firmware") or "1.0.0",
                    payload_key=item.get("payload_key") or None,
                )
            )
    else:
        for number, row in enumerate(csv.reader(io.StringIO(text)), 1):
            if not row or row[0].startswith("#") or row[0] == "client_id":
                continue
            if len(row) < 2:
                raise ValueError(f"line {number}: expected client_id,secret[,firmware]")
            specs.append(
                DeviceSpec(row[0].strip(), row[1].strip(), firmware=(row[2].strip() if len(row) > 2 else "1.0.0"))
            )
    return specs


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by the plain CLI and ``manage.py simulate``."""
    parser.add_argument(
        "--hostile", type=int, default=0, metavar="K", help="how many devices, chosen at random, attack"
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=0.2,
        metavar="R",
        help="telemetry messages per second per device, on average (each device has its own rhythm); default 0.2",
    )
    parser.add_argument(
        "--duration", type=float, default=0, metavar="SECONDS", help="stop after this long (0: run until Ctrl-C)"
    )
    parser.add_argument("--connect-rate", type=float, default=200.0, help="new connections per second while ramping up")
    parser.add_argument(
        "--hostile-interval", type=float, default=1.0, help="seconds between a hostile device's attacks"
    )
    parser.add_argument("--flood-burst", type=int, default=200, help="messages in one flood attack")
    parser.add_argument("--seed", type=int, default=None, help="random seed, for a repeatable run")
    parser.add_argument("--json", action="store_true", help="print the final summary as one JSON line")


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fleetkeeper_device.simulator",
        description=(
            "Simulate a fleet of MQTT devices speaking the Fleetkeeper device protocol, some of them hostile. "
            "Needs the devices' credentials (from the console: POST /api/v1/devices/<id>/credentials/). "
            "Prints one summary line per second; Ctrl-C or SIGTERM stops cleanly."
        ),
    )
    parser.add_argument("--host", default="127.0.0.1", help="broker host (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=18830, help="broker port (default 18830, Fleetkeeper's dev broker)")
    parser.add_argument(
        "--credentials",
        required=True,
        metavar="FILE",
        help="JSON list of {client_id, password} (or {client_id: secret}), or CSV client_id,secret[,firmware];"
        " - for stdin",
    )
    parser.add_argument(
        "--devices", type=int, default=0, metavar="N", help="use the first N devices of the file (default: all)"
    )
    parser.add_argument("--tx-prefix", default="tx")
    parser.add_argument("--rx-prefix", default="rx")
    parser.add_argument("--max-packet-size", type=int, default=64 * 1024, help="the broker's max_packet_size")
    parser.add_argument("--ca-file", default=None, help="connect with TLS, verifying the broker with this CA")
    parser.add_argument("--mqtt-version", choices=("5", "3.1.1"), default="5")
    add_run_arguments(parser)
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        specs = load_credentials(args.credentials)
    except (OSError, ValueError) as exc:
        parser.error(f"cannot read credentials from {args.credentials}: {exc}")
    if args.devices:
        if args.devices > len(specs):
            parser.error(f"--devices {args.devices}, but the credentials file holds {len(specs)}")
        specs = specs[: args.devices]
    rng = random.Random(args.seed)
    try:
        specs = choose_hostile(specs, args.hostile, rng)
    except ValueError as exc:
        parser.error(str(exc))
    tls = None
    if args.ca_file:
        from .tls import TLSOptions

        tls = TLSOptions(ca_file=args.ca_file)
    simulation = Simulation(
        specs,
        host=args.host,
        port=args.port,
        rate=args.rate,
        duration=args.duration or None,
        connect_rate=args.connect_rate,
        max_packet_size=args.max_packet_size,
        topic_scheme=TopicScheme(tx_prefix=args.tx_prefix, rx_prefix=args.rx_prefix),
        tls=tls,
        mqtt_version=args.mqtt_version,
        seed=rng.randrange(2**32),
        hostile_interval=args.hostile_interval,
        flood_burst=args.flood_burst,
    )
    result = simulation.run()
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
