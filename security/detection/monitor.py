"""The broker-log monitor: ``$SYS/broker/log/#`` lines -> the connection, authentication and subscription rules.

One monitor runs per broker (the monitor identity is one session, so it lives in consumer replica 1). Its state
(pending connections, failures per address, who is connected from where) is in memory: it sees every line in
order, which is exactly what attributing a refusal to its connection needs. Fingerprint history is in Redis so it
survives a restart.

The console's own canary probe is refused on purpose at every policy apply (a credential that must not work) and
may be refused while the broker is still loading the new files; those refusals come from the same address the
probe then logs in from. Refusals are held for DETECTION_PROBE_HOLD_SECONDS and dropped if the probe logs in from
that address meanwhile, so the console's own checks never read as an attack.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from django.conf import settings

from devices.models import Device
from security import topics
from security.enforcement.state import consumer_usernames
from security.revocation_sessions import purge_expected

from . import rules
from .ingest import raise_findings, with_db_retry

if TYPE_CHECKING:
    from .consumer import Consumer

SUBSCRIBE_LOG = "$SYS/broker/log/M/subscribe"
DEBUG_LOG_TOPIC = "file:debug"  # lines read from the broker's debug log file, not from the log topic
DEBUG_LOG_NAME = "broker-debug.log"

log = logging.getLogger("fleetkeeper.consumer")


def debug_log_path(broker_dir: str | Path) -> str:
    """Where the broker writes its debug log when DETECTION_DENIED_PUBLISHES is on (rendered into its config)."""
    return str(Path(broker_dir) / DEBUG_LOG_NAME)


class DebugLogTail:
    """Follows the broker's debug log file for the lines that matter (``Denied PUBLISH from ...``), the only place
    Mosquitto 2.0.11 reports a denied publish. The file carries every debug line (two per message delivered), so it
    is read in large chunks and searched for the marker, and truncated once it passes ``max_bytes`` (Mosquitto
    appends, O_APPEND, so its next line goes to the new end). Starts at the file's end: lines written while no
    monitor ran are not replayed (they would raise stale alerts after every restart)."""

    MARK = b"Denied PUBLISH from "

    def __init__(self, path: str, *, max_bytes: int, chunk: int = 8 * 1024 * 1024):
        self.path = path
        self.max_bytes = max_bytes
        self.chunk = chunk
        self.truncations = 0
        self.bytes_read = 0
        self._last = b""  # the bytes just before offset, to notice a file replaced by one of the same size
        try:  # an existing file: from its end; a file that appears later is new, read from its start
            st = os.stat(path)
            self.offset, self.inode = st.st_size, st.st_ino
        except OSError:
            self.offset, self.inode = 0, None

    def read(self) -> list[bytes]:
        try:
            st = os.stat(self.path)
        except OSError:  # not there (yet): the broker creates it when it starts with the option on
            return []
        if st.st_ino != self.inode or st.st_size < self.offset:  # new, replaced or truncated by someone else
            self.offset, self.inode = 0, st.st_ino
        lines: list[bytes] = []
        size = st.st_size
        with open(self.path, "rb") as handle:
            if self.offset and self._last:  # a file recreated with the same inode number: its bytes differ
                handle.seek(self.offset - len(self._last))
                if handle.read(len(self._last)) != self._last:
                    self.offset = 0
            while self.offset < size:
                handle.seek(self.offset)
                data = handle.read(min(self.chunk, size - self.offset))
                end = data.rfind(b"\n") + 1
                if not end:  # no complete line yet
                    if len(data) < self.chunk:
                        break
                    end = len(data)  # a single line longer than a chunk: skip it
                self._collect(data, end, lines)
                self.offset += end
                self.bytes_read += end
                self._last = data[max(0, end - 512) : end]
            if self.offset >= self.max_bytes:
                # Read whatever arrived meanwhile, then cut. A line written between that read and the truncation
                # is lost: a window of microseconds, once per max_bytes of log.
                handle.seek(self.offset)
                rest = handle.read()
                end = rest.rfind(b"\n") + 1
                self._collect(rest, end, lines)
                os.truncate(self.path, 0)
                self.offset, self._last = 0, b""
                self.truncations += 1
        return lines

    def _collect(self, data: bytes, end: int, lines: list[bytes]) -> None:
        find, mark = data.find, self.MARK
        i = find(mark, 0, end)
        while i >= 0:
            start = data.rfind(b"\n", 0, i) + 1
            stop = find(b"\n", i, end)
            stop = end if stop < 0 else stop
            lines.append(data[start:stop])
            i = find(mark, stop, end)


class BrokerLogMonitor:
    def __init__(self, consumer: Consumer):
        self.consumer = consumer
        self.console = {*consumer_usernames(), settings.MQTT_MONITOR_USERNAME, settings.MQTT_PROBE_USERNAME}
        self.probe = settings.MQTT_PROBE_USERNAME
        self.attribution = rules.ConnectionAttribution()
        self.auth = rules.AuthFailureRule(
            window=settings.DETECTION_AUTH_WINDOW_SECONDS,
            threshold=settings.DETECTION_AUTH_FAILURES_BRUTE_FORCE,
            spray_addresses=settings.DETECTION_AUTH_SPRAY_ADDRESSES,
        )
        self.hold_seconds = settings.DETECTION_PROBE_HOLD_SECONDS
        self.held: list[tuple[float, str]] = []
        self.connected_from: dict[str, set[str]] = {}
        self.address_of: dict[str, str] = {}
        self.fleet_prefix = settings.FLEET_CLIENT_ID_PREFIX
        self.rx_prefix = settings.MQTT_TOPIC_RX_PREFIX
        self.tx_prefix = settings.MQTT_TOPIC_TX_PREFIX
        self.debug_log: DebugLogTail | None = None
        self.debug_log_read_at = 0.0
        if settings.DETECTION_DENIED_PUBLISHES:
            self.debug_log = DebugLogTail(
                debug_log_path(settings.MQTT_BROKER_DIR), max_bytes=settings.DETECTION_DEBUG_LOG_MAX_BYTES
            )

    def process(self, lines: list[tuple[str, bytes, float]]) -> list[rules.Finding]:
        findings: list[rules.Finding] = []
        connects: list[rules.LogEvent] = []
        for topic, payload, received in lines:
            text = payload.decode("utf-8", errors="replace")
            event = rules.parse_log_line(text, subscribe=topic == SUBSCRIBE_LOG)
            if event is None:
                continue
            kind, client_id = event.kind, event.client_id
            if kind == "new_connection":
                self.attribution.opened(event.address, event.port, received)
            elif kind == "connected":
                self.attribution.connected(event.address, event.port)
                if client_id == self.probe:
                    self.held = [(t, a) for t, a in self.held if a != event.address]
                if client_id in self.console:
                    continue
                self._forget(client_id)
                self.connected_from.setdefault(event.address, set()).add(client_id)
                self.address_of[client_id] = event.address
                connects.append(event)
            elif kind == "not_authorised":
                self.held.append((received, self.attribution.refused(received)))
            elif kind == "gone":
                self._forget(client_id)
            elif client_id in self.console:
                continue
            elif kind == "takeover":
                findings.append(
                    rules.Finding(
                        "client_id_conflict",
                        subject=client_id,
                        client_id=client_id,
                        summary=f"A second connection took over {client_id}'s session",
                        evidence={"counts": {"takeovers": 1}, "samples": [event.line]},
                    )
                )
            elif kind == "oversize":
                findings.append(
                    rules.Finding(
                        "oversize_packet",
                        subject=client_id,
                        client_id=client_id,
                        summary=f"{client_id} sent a packet over the broker's limit and was disconnected",
                        evidence={
                            "counts": {"oversize": 1},
                            "limit_bytes": settings.MQTT_MAX_PACKET_SIZE,
                            "samples": [event.line],
                        },
                    )
                )
            elif kind == "denied_publish":
                findings.append(self._denied_publish(event))
            elif kind == "subscribe":
                why = rules.subscription_violation(
                    client_id, event.topic_filter, rx_prefix=self.rx_prefix, rx_channels=topics.RX_CHANNELS
                )
                if why:
                    findings.append(
                        rules.Finding(
                            "subscription_violation",
                            subject=client_id,
                            client_id=client_id,
                            summary=f"{client_id} subscribed to {event.topic_filter!r} ({why})",
                            evidence={
                                "counts": {"subscriptions": 1},
                                "samples": [{"filter": event.topic_filter, "why": why}],
                            },
                        )
                    )
        if connects:
            findings += self._connect_findings(connects)
        findings += self._release(time.time())
        with_db_retry(lambda: raise_findings(findings))
        return findings

    def tick(self) -> None:
        now = time.time()
        if self.debug_log is not None and now - self.debug_log_read_at >= 0.2:
            self.debug_log_read_at = now
            try:
                lines = self.debug_log.read()
            except OSError as exc:
                log.warning("cannot read the broker's debug log %s: %s", self.debug_log.path, exc)
                lines = []
            if lines:
                self.process([(DEBUG_LOG_TOPIC, line, now) for line in lines])
                return
        findings = self._release(now)
        with_db_retry(lambda: raise_findings(findings))

    def _denied_publish(self, event: rules.LogEvent) -> rules.Finding:
        topic = event.topic_filter
        parts = topic.split("/")
        target = parts[1] if len(parts) >= 3 and parts[0] in (self.tx_prefix, self.rx_prefix) else ""
        evidence = {
            "counts": {"denied_publishes": 1},
            "samples": [{"topic": topic, "qos": event.qos, "bytes": event.size}],
            "source": "broker debug log (DETECTION_DENIED_PUBLISHES)",
        }
        if target and target != event.client_id:
            evidence["target_client_id"] = target
        return rules.Finding(
            "publish_denied",
            subject=event.client_id,
            client_id=event.client_id,
            summary=f"{event.client_id} tried to publish on {topic!r}, which the broker's ACL denied",
            evidence=evidence,
        )

    def _forget(self, client_id: str) -> None:
        address = self.address_of.pop(client_id, None)
        if address is not None:
            ids = self.connected_from.get(address)
            if ids is not None:
                ids.discard(client_id)
                if not ids:
                    del self.connected_from[address]

    def _release(self, now: float) -> list[rules.Finding]:
        findings = []
        keep = []
        for received, address in self.held:
            if now - received < self.hold_seconds:
                keep.append((received, address))
                continue
            for finding in self.auth.failure(address, received):
                # The username is never logged; a device is named only when it is the one client connected from
                # that address (a hint, in the evidence, not proof).
                ids = self.connected_from.get(address, set())
                if len(ids) == 1 and finding.kind != "auth_spraying":
                    finding.evidence["only_client_connected_from_address"] = next(iter(ids))
                findings.append(finding)
        self.held = keep
        return findings

    def _connect_findings(self, connects: list[rules.LogEvent]) -> list[rules.Finding]:
        findings: list[rules.Finding] = []
        consumer = self.consumer
        ids = sorted({e.client_id for e in connects})
        enforced = (Device.Status.ACTIVE, Device.Status.QUARANTINED)
        statuses = dict(Device.objects.filter(client_id__in=ids).values_list("client_id", "status"))
        # The console's own session purge logs in as a revoked device (security/revocation_sessions.py): not an
        # unknown client, and not the device's fingerprint.
        purging = {cid for cid in ids if statuses.get(cid) not in enforced and purge_expected(cid)}
        if purging:
            connects = [e for e in connects if e.client_id not in purging]
            ids = [cid for cid in ids if cid not in purging]
        for event in connects:
            status = statuses.get(event.client_id)
            if event.client_id.startswith(self.fleet_prefix) and status not in enforced:
                findings.append(
                    rules.Finding(
                        "unknown_client",
                        subject=event.client_id,
                        client_id=event.client_id,
                        summary=f"{event.client_id} connected from {event.address} but the inventory "
                        + ("does not know it" if status is None else f"has it {status}"),
                        evidence={"source_address": event.address, "inventory_status": status, "line": event.line},
                    )
                )
        # Fingerprints: history per id in Redis (oldest first), checked in log order.
        pipe = consumer.redis.pipeline(transaction=False)
        for client_id in ids:
            pipe.lrange(f"{consumer.prefix}:fp:{client_id}", 0, -1)
        history = {cid: [h.decode() for h in rows] for cid, rows in zip(ids, pipe.execute(), strict=True)}
        keep = settings.DETECTION_FINGERPRINT_HISTORY
        pipe = consumer.redis.pipeline(transaction=False)
        for event in connects:
            print_ = rules.fingerprint(event)
            past = history[event.client_id]
            verdict = rules.fingerprint_verdict(past, print_)
            evidence = {
                "fingerprint": print_,
                "previous": past[-1] if past else "",
                "history": past[-keep:],
                "source_address": event.address,
            }
            if verdict == "alternating":
                findings.append(
                    rules.Finding(
                        "credential_cloned",
                        subject=event.client_id,
                        client_id=event.client_id,
                        summary=f"{event.client_id} alternates between two connection fingerprints: "
                        "its credential is probably used by two clients",
                        evidence=evidence,
                    )
                )
            elif verdict == "changed":
                findings.append(
                    rules.Finding(
                        "fingerprint_changed",
                        subject=event.client_id,
                        client_id=event.client_id,
                        summary=f"{event.client_id} connected as {print_} (was {past[-1]})",
                        evidence=evidence,
                    )
                )
            past.append(print_)
            key = f"{consumer.prefix}:fp:{event.client_id}"
            pipe.rpush(key, print_)
            pipe.ltrim(key, -keep, -1)
        pipe.execute()
        return findings
