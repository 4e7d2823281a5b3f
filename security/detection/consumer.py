"""The MQTT consumer: device messages in, per-device state and alerts out.

Two MQTT clients, each with its own network thread:
- the telemetry client logs in as a consumer identity and subscribes with shared subscriptions
  (``$share/<group>/tx/+/telemetry|status|ack|csr``), so N replicas split the load; on a broker without them
  (RabbitMQ 3.10, ``capabilities()["shared_subscriptions"]``) with plain ones, and one replica only. By default it is
  the lean subscriber of ``wire.py`` (DETECTION_MQTT_CLIENT=lean: many PUBLISH frames parsed per socket read and
  folded under one lock); ``paho`` keeps paho-mqtt's per-message callback;
- the monitor client (paho; replica 1 only: the monitor identity is one session) reads ``$SYS/broker/log/#`` on
  Mosquitto. On a broker that asks the hook (``capabilities()["events"] == "hook"``) there is no monitor client: replica
  1 reads the hook's refusals through the adapter's ``events()`` once a second (hook_monitor.py).

The telemetry network thread does O(1) work per message: it validates the message and folds it into the current
per-device aggregate (counts, bytes, min/max per reading, last status). One processor thread swaps that aggregate out
when it holds a full batch (or its oldest message has waited DETECTION_FLUSH_SECONDS) and does the per-batch work:
one Redis call for the rolling state of every device in it, the detectors, and (at most once a second) a few bulk
SQL statements — never one per message. Memory is bounded by the number of devices, not the message rate: when the
database is slow the aggregates get bigger, not more numerous, and the lag (age of the oldest message not yet
processed) is reported. A flooding device costs one aggregate per batch like any other, so it cannot starve the
others. Log lines go to a bounded deque for the same processor thread.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime

import paho.mqtt.client as mqtt
import redis
from django.conf import settings
from django.db import close_old_connections, connection

from fleetkeeper_device import protocol
from security import topics
from security.brokers import broker_capabilities
from security.enforcement.state import consumer_usernames

from . import baseline, payloads, wire
from .hook_monitor import HookEventMonitor

log = logging.getLogger("fleetkeeper.consumer")

try:  # optional: about 3x faster than json.loads on telemetry, and stricter (no NaN, no oversized integers)
    from orjson import JSONDecodeError as _OrjsonError
    from orjson import loads as _loads

    _DECODE_ERRORS: tuple[type[Exception], ...] = (ValueError, RecursionError, _OrjsonError)
except ImportError:  # pragma: no cover - the standard library does the same job, slower
    _loads = json.loads
    _DECODE_ERRORS = (ValueError, RecursionError)

TELEMETRY, STATUS, ACK, CSR = topics.TX_TELEMETRY, topics.TX_STATUS, topics.TX_ACK, topics.TX_CSR
CHANNELS = (TELEMETRY, STATUS, ACK, CSR)
# Answers to console messages (acks, CSRs) are handed, decoded, to the rotation inbox once per batch; at most this
# many wait at a time (a device flooding acks cannot grow memory: the excess is counted and dropped).
COMMAND_REPLIES_MAX = 50_000
HOOK_EVENTS_POLL_SECONDS = 1.0  # how often replica 1 reads a hook broker's refusals
LOG_TOPIC = "$SYS/broker/log/#"
SUBSCRIBE_LOG = "$SYS/broker/log/M/subscribe"
DROPPED_TOPIC = "$SYS/broker/publish/messages/dropped"


def _is_number(value) -> bool:
    return (type(value) is float and math.isfinite(value)) or type(value) is int


def check_telemetry(message) -> str:
    """The telemetry hot path: protocol.validate's checks for a telemetry message, fewer steps. "" when valid."""
    if type(message) is not dict:
        return "not a JSON object"
    if message.get("v") != protocol.PROTOCOL_VERSION or message.get("type") != "telemetry":
        return "not a version 1 telemetry message"
    values = message.get("values")
    if type(values) is not dict or len(values) > protocol.MAX_TELEMETRY_VALUES:
        return "values missing or too many"
    seq, ts, message_id = message.get("seq"), message.get("ts"), message.get("id")
    if type(seq) is not int or seq < 0 or not _is_number(ts) or ts < 0:
        return "bad seq or ts"
    if type(message_id) is not str or not 0 < len(message_id) <= 64:
        return "bad id"
    for name, value in values.items():
        if value is not None and type(value) is not bool and not _is_number(value):
            return f"values.{str(name)[:32]} is not a number"
        if name not in _GOOD_NAMES:
            if not protocol.is_name(name):
                return "bad reading name"
            if len(_GOOD_NAMES) < 10_000:
                _GOOD_NAMES.add(name)
    return ""


_GOOD_NAMES: set[str] = set()  # reading names already checked (a fleet has few)


@dataclass
class DeviceBatch:
    """One device's share of one batch."""

    messages: int = 0
    bytes: int = 0
    telemetry: int = 0
    malformed: int = 0
    malformed_reason: str = ""
    malformed_samples: list = field(default_factory=list)
    max_size: int = 0
    values: dict = field(default_factory=dict)  # name -> [min, max, count]
    status: dict | None = None
    sealed: payloads.SealedState | None = None  # only for devices that sent sealed (or forbidden clear) messages


@dataclass
class Stats:
    received: int = 0
    processed: int = 0
    malformed: int = 0
    bad_topic: int = 0
    batches: int = 0
    log_lines: int = 0
    broker_events: int = 0  # a hook broker's refusals read (events())
    lag_seconds: float = 0.0
    queued: int = 0
    last_batch_ms: float = 0.0
    errors: int = 0
    replies_dropped: int = 0
    broker_dropped: int = 0
    first_message_at: float = 0.0
    last_batch_at: float = 0.0
    sealed_opened: int = 0
    sealed_tampered: int = 0
    sealed_replayed: int = 0
    unencrypted: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class Consumer:
    def __init__(
        self,
        *,
        replica: int | None = None,
        monitor: bool | None = None,
        detectors: bool = True,
        host: str | None = None,
        port: int | None = None,
    ):
        self.replica = replica or settings.DETECTION_CONSUMER_REPLICA
        names = consumer_usernames()
        if not 1 <= self.replica <= len(names):
            raise ValueError(
                f"replica {self.replica} has no consumer identity: MQTT_CONSUMER_REPLICAS is {len(names)} "
                "(raise it and re-sync the broker policy)"
            )
        self.username = names[self.replica - 1]
        capabilities = broker_capabilities()
        self.shared_subscriptions = bool(capabilities.get("shared_subscriptions"))
        if not self.shared_subscriptions and len(names) > 1:
            raise ValueError(
                f"the {capabilities['name']} broker has no shared subscriptions: each replica would receive every "
                f"message. Run one consumer (MQTT_CONSUMER_REPLICAS=1; it is {len(names)})"
            )
        self.monitor_enabled = (
            (settings.DETECTION_MONITOR_ENABLED and self.replica == 1) if monitor is None else monitor
        )
        self.events_source = capabilities.get("events", "log")
        self.detectors = detectors
        self.host = host or settings.MQTT_HOST
        self.port = port or settings.MQTT_PORT
        self.batch_max = settings.DETECTION_BATCH_MAX
        self.flush_seconds = settings.DETECTION_FLUSH_SECONDS
        self.prefix = settings.DETECTION_REDIS_PREFIX
        self.tx_prefix = settings.MQTT_TOPIC_TX_PREFIX
        self._lock = threading.Lock()
        self._current: dict[str, DeviceBatch] = defaultdict(DeviceBatch)
        self._current_count = 0
        self._current_since = 0.0
        self._topics: dict = {}
        self.log_lines: deque = deque(maxlen=100_000)
        self.replies: deque = deque()  # (client_id, channel, message) for security.rotation.inbox
        self.stats = Stats()
        self._dropped_reported = -1  # the broker's counter as last reported (-1: first value, history, not logged)
        self._dropped_seen = False
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._clients: list[mqtt.Client] = []
        self.client_kind = settings.DETECTION_MQTT_CLIENT
        if self.client_kind not in ("lean", "paho"):
            raise ValueError(f"DETECTION_MQTT_CLIENT is {self.client_kind!r}: use 'lean' or 'paho'")
        self.subscriber: wire.Subscriber | None = None
        self.redis = redis.Redis.from_url(settings.REDIS_URL)
        from .ingest import PendingWrites

        self.pending = PendingWrites()
        self.db_flush_seconds = settings.DETECTION_DB_FLUSH_SECONDS
        self.value_cache: dict[str, tuple[float, dict, bool]] = {}
        self.cache_seconds = settings.DETECTION_STATE_CACHE_SECONDS
        self.cache_max = 200_000
        self._window_script = self.redis.register_script(baseline.WINDOW_SCRIPT)
        # Payload encryption: keys cached in the process (network thread reads, processor thread refreshes),
        # this process's replay windows, and the shared window script (security/detection/payloads.py).
        self.payload_keys = payloads.KeyCache()
        self.replay_windows: dict[str, tuple[bytes, object]] = {}
        self.payload_refresh_wanted = False
        self._replay_script = self.redis.register_script(payloads.REPLAY_SCRIPT)
        self.thresholds = baseline.Thresholds(
            min_windows=settings.DETECTION_BASELINE_MIN_WINDOWS,
            rate_factor=settings.DETECTION_RATE_FACTOR,
            rate_min_excess=settings.DETECTION_RATE_MIN_EXCESS,
            rate_absolute=settings.DETECTION_RATE_ABSOLUTE_PER_WINDOW,
            size_factor=settings.DETECTION_SIZE_FACTOR,
            size_min_bytes=settings.DETECTION_SIZE_MIN_BYTES,
        )
        from .monitor import BrokerLogMonitor

        self.monitor = BrokerLogMonitor(self) if self.monitor_enabled and self.events_source == "log" else None
        self.hook_events: HookEventMonitor | None = None  # made at start, where the event stream's reading begins
        self._hook_events_wanted = self.monitor_enabled and self.events_source == "hook"
        self._hook_events_polled = 0.0

    # --- lifecycle
    def start(self) -> Consumer:
        self.payload_keys.refresh(force=True)
        if self._hook_events_wanted:
            self._poll_hook_events(force=True)
        if self.client_kind == "lean":
            self.subscriber = wire.Subscriber(
                host=self.host,
                port=self.port,
                username=self.username,
                password=settings.MQTT_CONSUMER_PASSWORD,
                subscriptions=self.subscriptions(shared=self.shared_subscriptions),
                on_publishes=self._on_publishes,
                keepalive=30,
                reconnect_max=settings.DETECTION_RECONNECT_MAX_SECONDS,
                name=f"mqtt-telemetry-{self.replica}",
            )
        else:
            client = self._client(self.username, settings.MQTT_CONSUMER_PASSWORD, self._on_connect_telemetry)
            client.on_message = self._on_message
            self._clients.append(client)
        if self.monitor is not None:
            client = self._client(
                settings.MQTT_MONITOR_USERNAME, settings.MQTT_MONITOR_PASSWORD, self._on_connect_monitor
            )
            client.on_message = self._on_log_message
            self._clients.append(client)
        worker = threading.Thread(target=self._run, name=f"mqtt-consumer-{self.replica}", daemon=True)
        worker.start()
        self._threads.append(worker)
        if self.subscriber is not None:
            self.subscriber.start()
        for client in self._clients:
            client.connect_async(self.host, self.port, keepalive=30)
            client.loop_start()
        log.info(
            "MQTT consumer %s started (broker refusals from: %s)",
            self.username,
            "the broker log" if self.monitor else "the hook's events" if self._hook_events_wanted else "nowhere",
        )
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self.subscriber is not None:
            self.subscriber.stop()
        for client in self._clients:
            client.disconnect()
            client.loop_stop()
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout)
        log.info("MQTT consumer %s stopped: %s", self.username, self.stats.as_dict())

    def connected(self) -> bool:
        """Every connection up (and the telemetry one subscribed)."""
        up = all(c.is_connected() for c in self._clients)
        return up and (self.subscriber is None or self.subscriber.is_connected())

    @staticmethod
    def subscriptions(*, shared: bool = True) -> list[tuple[str, int]]:
        """``shared``: through the broker's shared subscriptions (``$share/<group>/...``), so replicas split the load.
        QoS 1: status, ack and csr are published at QoS 1 and must not be lost; telemetry keeps its own QoS."""
        group = settings.MQTT_SHARED_SUBSCRIPTION_GROUP if shared else None
        return [(topics.fleet_tx_filter(channel, shared_group=group), 1) for channel in CHANNELS]

    def _client(self, username: str, password: str, on_connect) -> mqtt.Client:
        # use_username_as_clientid: the client id is the username anyway; naming it keeps the logs readable.
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=username,
            protocol=mqtt.MQTTv311,
            clean_session=True,
            reconnect_on_failure=True,
        )
        client.username_pw_set(username, password)
        client.reconnect_delay_set(min_delay=1, max_delay=max(1, settings.DETECTION_RECONNECT_MAX_SECONDS))
        client.max_queued_messages_set(0)
        client.on_connect = on_connect
        return client

    def _on_connect_telemetry(self, client, _userdata, _flags, reason, _props) -> None:
        if reason.is_failure:
            log.warning("consumer %s refused by the broker: %s", self.username, reason)
            return
        client.subscribe(self.subscriptions(shared=self.shared_subscriptions))

    def _on_connect_monitor(self, client, _userdata, _flags, reason, _props) -> None:
        if reason.is_failure:
            log.warning("monitor refused by the broker: %s", reason)
            return
        client.subscribe([(LOG_TOPIC, 0), (DROPPED_TOPIC, 0)])

    # --- network threads: O(1) per message
    def _on_message(self, _client, _userdata, message) -> None:
        """O(1) per message: validate and fold it into the current per-device aggregate. Memory is bounded by the
        number of devices, not by the message rate: a slow database makes aggregates bigger, never more."""
        now = time.time()
        with self._lock:
            self._add(self._current, message._topic, message.payload)
            self._current_count += 1
            if self._current_count == 1:
                self._current_since = now
                if not self.stats.received:
                    self.stats.first_message_at = now
            if self._current_count == self.batch_max:  # wake the processor once per full batch
                self._wake.set()
        self.stats.received += 1

    def _on_publishes(self, publishes: list[wire.Publish]) -> None:
        """The lean subscriber's callback: every PUBLISH of one socket read, folded under one lock. A message that
        makes the fold fail is counted as an error and skipped; the rest of the read is still folded."""
        now = time.time()
        count = len(publishes)
        with self._lock:
            current, add = self._current, self._add
            for topic, payload, _qos, _packet_id in publishes:
                try:
                    add(current, topic, payload)
                except Exception:  # never let one message stop the connection
                    self.stats.errors += 1
                    if self.stats.errors <= 10 or not self.stats.errors % 1000:
                        log.exception("message on %r could not be folded; skipped", topic[:200])
            before = self._current_count
            self._current_count = before + count
            if not before:
                self._current_since = now
                if not self.stats.received:
                    self.stats.first_message_at = now
            if before < self.batch_max <= before + count:  # wake the processor once per full batch
                self._wake.set()
        self.stats.received += count

    def _on_log_message(self, _client, _userdata, message) -> None:
        if message.topic == DROPPED_TOPIC:
            try:
                self.stats.broker_dropped = int(message.payload)
                self._dropped_seen = True
            except ValueError:
                pass
            return
        self.log_lines.append((message.topic, message.payload, time.time()))

    # --- the processor thread
    def _run(self) -> None:
        last_report = 0.0
        try:
            while not self._stop.is_set() or self._current_count or self.log_lines or self.replies:
                self._wake.wait(self.flush_seconds / 4)
                self._wake.clear()
                try:
                    self.drain()
                except Exception:  # never let one bad batch stop the consumer
                    self.stats.errors += 1
                    log.exception("batch failed; the consumer keeps running")
                    close_old_connections()
                    time.sleep(0.5)
                if time.monotonic() - last_report > 2.0:
                    last_report = time.monotonic()
                    self._report()
                if self._stop.is_set() and not self._current_count and not self.log_lines and not self.replies:
                    break
        finally:
            if self.pending.activity:
                from .ingest import flush_pending

                try:
                    flush_pending(self)
                except Exception:
                    log.exception("last database flush failed")
            self._report()
            connection.close()

    def drain(self) -> int:
        """Process everything waiting now, in batches. Returns messages processed (also used by tests)."""
        done = 0
        if self.monitor is not None and self.log_lines:
            lines = []
            while self.log_lines:
                lines.append(self.log_lines.popleft())
            self.monitor.process(lines)
            self.stats.log_lines += len(lines)
        if self.replies:
            self._deliver_replies()
        # Full batches while busy (the per-batch cost is per device, not per message); a partial batch once its
        # oldest message has waited DETECTION_FLUSH_SECONDS (or when stopping).
        if self._current_count and (
            self._current_count >= self.batch_max
            or time.time() - self._current_since >= self.flush_seconds
            or self._stop.is_set()
        ):
            with self._lock:
                devices, count, since = self._current, self._current_count, self._current_since
                self._current, self._current_count = defaultdict(DeviceBatch), 0
            self.stats.lag_seconds = round(time.time() - since, 3)
            started = time.perf_counter()
            self._ingest(devices, count)
            self.stats.last_batch_ms = round((time.perf_counter() - started) * 1000, 1)
            done += count
        if self.monitor is not None:
            self.monitor.tick()
        if self._hook_events_wanted:
            self._poll_hook_events()
        if self.pending.activity and time.time() - self.pending.last_flush >= self.db_flush_seconds:
            from .ingest import flush_pending

            flush_pending(self)
        self.stats.queued = self._current_count
        if not self._current_count:
            self.stats.lag_seconds = 0.0
        return done

    def _poll_hook_events(self, *, force: bool = False) -> None:
        """A hook broker's refusals since the last poll become alerts (at most once a second). While the event
        stream's Redis is down nothing is read; the events wait in the stream and are read when it is back."""
        now = time.monotonic()
        if not force and now - self._hook_events_polled < HOOK_EVENTS_POLL_SECONDS:
            return
        self._hook_events_polled = now
        try:
            if self.hook_events is None:
                self.hook_events = HookEventMonitor()
                return
            self.hook_events.poll()
        except redis.RedisError as exc:
            log.warning("cannot read the hook's events (%s); they wait in the stream", exc)
            return
        self.stats.broker_events = self.hook_events.read

    def _deliver_replies(self) -> None:
        from security.rotation.inbox import device_replies_received

        replies = []
        while self.replies:
            replies.append(self.replies.popleft())
        device_replies_received(replies)

    def _report(self) -> None:
        stats = self.stats.as_dict()
        if self.subscriber is not None:
            stats.update({f"mqtt_{k}": v for k, v in self.subscriber.stats.__dict__.items()})
        try:
            key = f"{self.prefix}:consumer:{self.username}"
            self.redis.hset(key, mapping={**{k: str(v) for k, v in stats.items()}, "updated": str(time.time())})
            self.redis.expire(key, 300)
        except redis.RedisError:
            pass
        dropped = stats["broker_dropped"]
        if self._dropped_seen and dropped > self._dropped_reported:
            # $SYS/broker/publish/messages/dropped: publishes the broker threw away because a client's queue was full
            # (MQTT_MAX_QUEUED_MESSAGES / MQTT_MAX_QUEUED_BYTES) or it was offline without a session. Counted for the
            # whole broker; the consumer cannot tell whose.
            if self._dropped_reported >= 0:
                log.warning(
                    "the broker dropped %d more messages (%d since it started): a subscriber's queue was full "
                    "(MQTT_MAX_QUEUED_MESSAGES) or a client was offline",
                    dropped - self._dropped_reported,
                    dropped,
                )
            self._dropped_reported = dropped
        if stats["lag_seconds"] > 5:
            log.warning(
                "consumer %s is %.1f s behind (%d queued)", self.username, stats["lag_seconds"], stats["queued"]
            )

    # --- one batch
    def aggregate(self, batch) -> dict[str, DeviceBatch]:
        """A list of (topic, payload, received) -> per-device aggregates (the same fold as the live path)."""
        devices: dict[str, DeviceBatch] = defaultdict(DeviceBatch)
        for topic, payload, _received in batch:
            self._add(devices, topic, payload)
        return devices

    def _add(self, devices: dict[str, DeviceBatch], topic, payload: bytes) -> None:
        parsed = self._topics.get(topic)
        if parsed is None:
            parsed = self._parse_topic(topic)
        if not parsed:
            self.stats.bad_topic += 1
            return
        client_id, channel = parsed
        device = devices[client_id]
        size = len(payload)
        device.messages += 1
        device.bytes += size
        if size > device.max_size:
            device.max_size = size
        if size > protocol.MAX_MESSAGE_BYTES:
            self._malformed(device, channel, f"{size} bytes; the limit is {protocol.MAX_MESSAGE_BYTES}", size)
            return
        self._fold(device, client_id, channel, topic, payload)

    def _fold(self, device: DeviceBatch, client_id: str, channel: str, topic, payload: bytes, *, retrying=False):
        """Open (when sealed), validate and fold one message into its device's aggregate."""
        if payload[:1] == payloads.SEALED:
            payload = payloads.open_sealed(self, device, client_id, channel, topic, payload, retrying=retrying)
            if payload is None:
                return
        elif self.payload_keys.keys:
            entry = self.payload_keys.keys.get(client_id)
            if entry is not None and entry.required:
                payloads.count_unencrypted(device, channel, len(payload))
                return
        reason = ""
        if channel == TELEMETRY:
            try:
                message = _loads(payload)
            except _DECODE_ERRORS:
                reason = "not JSON"
            else:
                reason = check_telemetry(message)
                if not reason:
                    device.telemetry += 1
                    values = device.values
                    for name, value in message["values"].items():
                        if value is None or type(value) is bool:
                            continue
                        seen = values.get(name)
                        if seen is None:
                            values[name] = [value, value, 1]
                        else:
                            if value < seen[0]:
                                seen[0] = value
                            elif value > seen[1]:
                                seen[1] = value
                            seen[2] += 1
        else:
            try:
                message = protocol.decode(payload, channel=channel)
            except protocol.ProtocolError as exc:
                reason = exc.reason[:200]
            else:
                if channel == STATUS:
                    device.status = message
                    if message.get("fallback") and len(self.replies) < COMMAND_REPLIES_MAX:
                        # A rotated secret refused, the device back on its previous one: the rotation inbox judges.
                        self.replies.append((client_id, channel, message))
                elif len(self.replies) < COMMAND_REPLIES_MAX:  # ack or csr: the rotation inbox's business
                    self.replies.append((client_id, channel, message))
                else:
                    self.stats.replies_dropped += 1
        if reason:
            self._malformed(device, channel, reason, len(payload))

    @staticmethod
    def _malformed(device: DeviceBatch, channel: str, reason: str, size: int) -> None:
        device.malformed += 1
        device.malformed_reason = reason
        if len(device.malformed_samples) < 3:
            device.malformed_samples.append({"channel": channel, "reason": reason, "size": size})

    def _parse_topic(self, topic) -> tuple[str, str] | tuple[()]:
        """``tx/<id>/<channel>`` (bytes or str) -> (id, channel), () when it is not one; remembered per topic."""
        text = topic.decode("utf-8", errors="replace") if isinstance(topic, bytes | bytearray) else topic
        parts = text.split("/")
        ok = len(parts) == 3 and parts[0] == self.tx_prefix and parts[2] in CHANNELS and parts[1]
        parsed = (parts[1], parts[2]) if ok else ()
        if len(self._topics) < 500_000:
            self._topics[topic] = parsed
        return parsed

    def process(self, batch) -> None:
        """Aggregate and ingest an explicit list of (topic, payload, received) (tests, tools)."""
        self._ingest(self.aggregate(batch), len(batch))

    def _ingest(self, devices: dict[str, DeviceBatch], count: int) -> None:
        from .ingest import ingest_batch

        sealed_findings = payloads.process_batch(self, devices)
        self.stats.malformed += sum(d.malformed for d in devices.values())
        if devices:
            ingest_batch(self, devices)
        if sealed_findings:
            from .ingest import raise_findings, with_db_retry

            with_db_retry(lambda: raise_findings(sealed_findings))
        self.stats.processed += count
        self.stats.batches += 1
        self.stats.last_batch_at = time.time()


def now_utc() -> datetime:
    return datetime.now(tz=UTC)
