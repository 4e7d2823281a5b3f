"""Hostile devices for the simulator: a compromised device with valid credentials of its own, trying
what an attacker tries. Each attempt is recorded with what the broker did about it, so a run shows at a
glance whether enforcement holds (``breaches`` must stay 0, ``leaked`` must stay 0).

Attacks, in a shuffled round-robin, one every ``interval`` seconds:
- ``brute_force``: connect as another device with guessed passwords (expect CONNACK refused);
- ``wildcard_subscribe``: subscribe to ``#``, ``+/#`` and ``$SYS/#`` (Mosquitto's acl_file grants the
  SUBSCRIBE and filters each delivery, so the verdict is what arrives: anything from another device
  or ``$SYS`` is counted as ``leaked``);
- ``cross_publish``: publish on another device's telemetry topic and forge a command on its
  ``rx/<id>/command`` (MQTT 5 QoS 1: the broker answers PUBACK 0x87, not authorised);
- ``oversize``: publish one packet over the broker's ``max_packet_size`` (expect to be disconnected);
- ``takeover``: connect with another device's client id and its own credentials (with
  ``use_username_as_clientid`` the broker uses the username as the id, so the victim stays online;
  a victim kicked with "session taken over" is a breach);
- ``replay``: re-send a captured telemetry payload, on its own topic (the broker accepts it; catching
  replays is the console's job) and on a victim's (refused). With a payload key the capture is a sealed
  message, and the console must drop the copy and raise ``payload_replayed``;
- ``tamper``: (with a payload key) flip one bit of a captured sealed message and publish it on its own topic
  (the broker accepts it; the console must drop it and raise ``payload_tampered``);
- ``flood``: a burst of messages on its own topic (accepted by the broker; rate detection's job).
"""

from __future__ import annotations

import json
import random
import secrets
import time
from collections import Counter
from typing import TYPE_CHECKING

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from . import protocol, sealing

if TYPE_CHECKING:
    from .client import DeviceClient
    from .reactor import Reactor
    from .topics import TopicScheme

ATTACKS = (
    "brute_force",
    "wildcard_subscribe",
    "cross_publish",
    "oversize",
    "takeover",
    "replay",
    "flood",
    "tamper",
)
WILDCARDS = ("#", "+/#", "$SYS/#")
SESSION_TAKEN_OVER = 142
PACKET_TOO_LARGE = 149


class HostileAgent:
    def __init__(
        self,
        device: DeviceClient,
        *,
        secret: str,
        victims: list[DeviceClient],
        reactor: Reactor,
        topic_scheme: TopicScheme,
        totals: Counter,
        rng: random.Random,
        interval: float = 1.0,
        max_packet_size: int = 64 * 1024,
        flood_burst: int = 200,
        attacks: tuple[str, ...] = ATTACKS,
    ):
        self.device = device
        self.secret = secret
        self.victims = [v for v in victims if v.client_id != device.client_id]
        self.reactor = reactor
        self.topics = topic_scheme
        self.totals = totals
        self.rng = rng
        self.interval = interval
        self.max_packet_size = max_packet_size
        self.flood_burst = flood_burst
        self.attacks = list(attacks)
        self.stats: Counter[str] = Counter()
        self._queue: list[str] = []
        self._pending_publishes: dict[int, str] = {}
        self._oversize_sent_at: float | None = None
        self._probes: set[mqtt.Client] = set()
        self._timer = None
        self._stopped = False
        self.log: list[str] = []

    # --- bookkeeping
    def _count(self, key: str, n: int = 1) -> None:
        self.stats[key] += n
        self.totals[f"hostile_{key}"] += n

    def _refused(self, what: str) -> None:
        self._count(f"refused_{what}")
        self.totals["refused"] += 1

    def _breach(self, what: str) -> None:
        self._count(f"breach_{what}")
        self.totals["breaches"] += 1
        self.log.append(f"{self.device.client_id}: {what} was NOT refused")

    def start(self) -> None:
        self._timer = self.reactor.call_later(self.rng.uniform(0.5, 1.0) + self.interval, self._tick)

    def stop(self) -> None:
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
        for probe in list(self._probes):
            self._close_probe(probe)

    def _victim(self) -> DeviceClient | None:
        return self.rng.choice(self.victims) if self.victims else None

    def _tick(self) -> None:
        if self._stopped:
            return
        if self.device.connected:
            if not self._queue:
                self._queue = self.attacks[:]
                self.rng.shuffle(self._queue)
            attack = self._queue.pop()
            self._count("attempts")
            self._count(f"attempts_{attack}")
            getattr(self, f"_attack_{attack}")()
        self._timer = self.reactor.call_later(self.interval * self.rng.uniform(0.7, 1.3), self._tick)

    # --- device events (called by the simulator's event sink)
    def on_connected(self) -> None:
        self._subscribe_wildcards()

    def on_unexpected_message(self, topic: str) -> None:
        own = f"/{self.device.client_id}/"
        if own not in topic:
            self._count("leaked")
            self.totals["leaked"] += 1
            if len(self.log) < 100:
                self.log.append(f"{self.device.client_id} received {topic!r} through a wildcard")

    def on_published(self, mid: int, reason_code: int) -> None:
        what = self._pending_publishes.pop(mid, None)
        if what is None:
            return
        if reason_code >= 0x80:
            self._refused(what)
        else:
            self._breach(what)

    def on_subscribed(self, reason_codes: list[int]) -> None:
        for code in reason_codes:
            self._count("subscribe_granted" if code < 0x80 else "subscribe_refused")

    def on_disconnected(self, reason_code: int) -> None:
        # MQTT 5: the broker says why (0x95 Packet too large); any other disconnect is not the verdict.
        if self._oversize_sent_at is not None:
            self._oversize_sent_at = None
            if reason_code == PACKET_TOO_LARGE:
                self._refused("oversize")
            else:  # dropped for another reason (its own takeover attempt) before the verdict: try again later
                self._count("oversize_inconclusive")

    # --- attacks
    def _subscribe_wildcards(self) -> None:
        client = self.device.mqtt
        if client is not None:
            client.subscribe([(w, 0) for w in WILDCARDS])

    def _attack_wildcard_subscribe(self) -> None:
        self._subscribe_wildcards()

    def _publish_qos1(self, topic: str, payload: bytes, what: str) -> None:
        info = self.device.mqtt.publish(topic, payload, qos=1)
        self._pending_publishes[info.mid] = what
        self.totals["messages"] += 1

    def _attack_cross_publish(self) -> None:
        victim = self._victim()
        if victim is None:
            return
        fake = protocol.encode_telemetry(
            message_id=secrets.token_hex(6), ts=time.time(), seq=1, values={"temperature": 99.9, "battery": 1}
        )
        self._publish_qos1(victim.telemetry_topic, fake, "cross_publish")
        forged = protocol.encode("command", id=f"forged-{secrets.token_hex(4)}", name="factory_reset")
        self._publish_qos1(self.topics.rx(victim.client_id, "command"), forged, "forged_command")

    def _attack_oversize(self) -> None:
        payload = b"x" * (self.max_packet_size + 1024)
        self._oversize_sent_at = time.monotonic()
        self.device.mqtt.publish(self.device.telemetry_topic, payload, qos=0)
        self.totals["messages"] += 1
        self.reactor.call_later(3.0, self._oversize_verdict, self._oversize_sent_at)

    def _oversize_verdict(self, sent_at: float) -> None:
        if self._oversize_sent_at == sent_at:  # still connected 3 s later: the broker took it
            self._oversize_sent_at = None
            self._breach("oversize")

    def _attack_replay(self) -> None:
        captured = self.device.last_telemetry
        if captured is None:
            return
        self.device.mqtt.publish(self.device.telemetry_topic, captured, qos=0)
        self.totals["messages"] += 1
        self._count("replayed_own_topic")
        victim = self._victim()
        if victim is not None:
            self._publish_qos1(victim.telemetry_topic, captured, "replay_on_victim")

    def _attack_tamper(self) -> None:
        captured = self.device.last_telemetry
        if captured is None or not sealing.is_sealed(captured):
            return  # nothing sealed to tamper with: this device has no payload key
        tampered = bytearray(captured)
        position = self.rng.randrange(sealing.HEADER_BYTES, len(tampered))
        tampered[position] ^= 1 << self.rng.randrange(8)
        self.device.mqtt.publish(self.device.telemetry_topic, bytes(tampered), qos=0)
        self.totals["messages"] += 1
        self._count("tampered_own_topic")

    def _attack_flood(self) -> None:
        client = self.device.mqtt
        now = time.time()
        for seq in range(self.flood_burst):
            payload = protocol.encode_telemetry(
                message_id=f"flood-{secrets.token_hex(4)}-{seq}", ts=now, seq=seq, values={"temperature": 0.0}
            )
            client.publish(self.device.telemetry_topic, payload, qos=0)
        self._count("flood_messages", self.flood_burst)
        self.totals["messages"] += self.flood_burst

    def _attack_brute_force(self) -> None:
        victim = self._victim()
        if victim is None:
            return
        guesses = [victim.client_id, "password", "admin", secrets.token_urlsafe(32)]
        for guess in self.rng.sample(guesses, 2):
            self._probe(client_id=victim.client_id, username=victim.client_id, password=guess, what="brute_force")

    def _attack_takeover(self) -> None:
        victim = self._victim()
        if victim is None:
            return
        started = time.monotonic()
        before = victim.stats["taken_over"]
        self._probe(client_id=victim.client_id, username=self.device.client_id, password=self.secret, what="takeover")
        self.reactor.call_later(1.5, self._takeover_verdict, victim, before, started)

    def _takeover_verdict(self, victim: DeviceClient, before: int, started: float) -> None:
        if victim.stats["taken_over"] > before:
            self._breach("takeover")
        else:
            self._refused("takeover")

    # --- one-shot connections for brute force and takeover, driven by the same reactor
    def _probe(self, *, client_id: str, username: str, password: str, what: str) -> None:
        probe = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        probe.username_pw_set(username, password)
        probe.connect_timeout = 3.0

        def on_connect(client, userdata, flags, reason_code, properties):
            if what == "brute_force":
                if reason_code.is_failure:
                    self._refused("brute_force")
                else:
                    self._breach("brute_force")
            if not reason_code.is_failure:
                client.disconnect()

        def on_disconnect(client, userdata, flags, reason_code, properties):
            self.reactor.call_later(0, self._close_probe, client)

        probe.on_connect = on_connect
        probe.on_disconnect = on_disconnect
        self.reactor.attach(probe)
        self._probes.add(probe)
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 0
        try:
            probe.connect(self.device.host, self.device.port, keepalive=30, clean_start=True, properties=properties)
        except OSError:
            self._close_probe(probe)
            return
        # A probe that hears nothing is closed after a while; it must not linger.
        self.reactor.call_later(5.0, self._close_probe, probe)

    def _close_probe(self, probe: mqtt.Client) -> None:
        if probe not in self._probes:
            return
        self._probes.discard(probe)
        if probe.socket() is not None:
            probe.disconnect()
            # Give the DISCONNECT a moment to be written, then drop the socket for good.
            self.reactor.call_later(0.5, self._drop_probe, probe)
        else:
            self.reactor.detach(probe)

    def _drop_probe(self, probe: mqtt.Client) -> None:
        sock = probe.socket()
        if sock is not None:
            probe._sock_close()
        self.reactor.detach(probe)

    def summary(self) -> dict:
        return json.loads(json.dumps(self.stats))
