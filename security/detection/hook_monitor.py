"""Detection for a broker that asks the console (BROKER_BACKEND=rabbitmq or emqx): the hook's refusals, read through
the adapter's ``events()``, raise the same alerts as Mosquitto's log lines do (security/detection/monitor.py).

The hook knows more than Mosquitto's log: each refused login names its username, so failed logins are counted per
source address when the broker says it (EMQX) and per username otherwise (RabbitMQ 3.10's login request carries no
address): a burst is brute force, many sources or usernames failing at once is spraying.
"""

from __future__ import annotations

from django.conf import settings

from security.brokers import get_adapter
from security.brokers.hook_adapter import HookBrokerAdapter
from security.enforcement.events import LOGIN_FAILURES, BrokerEvent

from . import rules
from .ingest import raise_findings, with_db_retry


class HookEventMonitor:
    def __init__(self, adapter: HookBrokerAdapter | None = None):
        adapter = adapter or get_adapter()
        if not isinstance(adapter, HookBrokerAdapter):
            raise TypeError("HookEventMonitor reads a hook broker's events: BROKER_BACKEND is mosquitto")
        self.adapter = adapter
        self.after = adapter.events_start()
        self.read = 0  # events read so far
        self.probe = settings.MQTT_PROBE_USERNAME
        self.auth = rules.AuthFailureRule(
            window=settings.DETECTION_AUTH_WINDOW_SECONDS,
            threshold=settings.DETECTION_AUTH_FAILURES_BRUTE_FORCE,
            spray_addresses=settings.DETECTION_AUTH_SPRAY_ADDRESSES,
        )

    def poll(self) -> list[rules.Finding]:
        """Read what came since the last poll, raise its alerts, return the findings."""
        found = self.adapter.events(self.after)
        if found:
            self.after = found[-1].id
            self.read += len(found)
        findings = self.process(found)
        with_db_retry(lambda: raise_findings(findings))
        return findings

    def process(self, found: list[BrokerEvent]) -> list[rules.Finding]:
        findings: list[rules.Finding] = []
        for event in found:
            if event.username == self.probe:
                continue  # the canary is refused on purpose at every apply
            if event.kind in LOGIN_FAILURES:
                source = event.ip or f"username {event.username or '(none)'}"
                for finding in self.auth.failure(source, event.at):
                    finding.evidence["broker"] = event.broker
                    if event.username:
                        finding.evidence["username"] = event.username
                    findings.append(finding)
            elif event.kind == "publish_denied":
                findings.append(self._finding("publish_denied", event, f"tried to publish on {event.topic!r}"))
            elif event.kind == "subscribe_denied":
                findings.append(
                    self._finding("subscription_violation", event, f"tried to subscribe to {event.topic!r}")
                )
            elif event.kind == "client_id_mismatch":
                findings.append(
                    self._finding(
                        "client_id_conflict",
                        event,
                        f"presented {event.username}'s credential with the client id {event.client_id!r}",
                        subject=event.username,
                    )
                )
        return findings

    @staticmethod
    def _finding(kind: str, event: BrokerEvent, what: str, *, subject: str = "") -> rules.Finding:
        subject = subject or event.client_id or event.username
        return rules.Finding(
            kind,
            subject=subject,
            client_id=subject,
            summary=f"{subject} {what}, which the broker's hook refused",
            evidence={
                "counts": {kind: 1},
                "samples": [{"topic": event.topic, "permission": event.permission, "check": event.check}],
                "source": f"{event.broker} hook",
                **({"source_address": event.ip} if event.ip else {}),
            },
        )
