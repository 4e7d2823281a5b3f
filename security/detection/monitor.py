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

import time
from typing import TYPE_CHECKING

from django.conf import settings

from devices.models import Device
from security import topics
from security.brokers import consumer_usernames

from . import rules
from .ingest import raise_findings, with_db_retry

if TYPE_CHECKING:
    from .consumer import Consumer

SUBSCRIBE_LOG = "$SYS/broker/log/M/subscribe"


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
        findings = self._release(time.time())
        with_db_retry(lambda: raise_findings(findings))

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
