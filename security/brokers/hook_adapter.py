"""The interface of a broker that asks the console at every connect, publish and subscribe (design.md's verbs for
clustered brokers): RabbitMQ (security/brokers/rabbitmq.py) and EMQX (security/brokers/emqx.py)."""

from __future__ import annotations

import abc
import secrets
import time

from django.conf import settings

from security.enforcement import events as hook_events

from .base import ApplyResult, ProbeResult, ms_since
from .mqtt_client import connect_code


class HookBrokerAdapter(abc.ABC):
    """A broker that asks the console at every connect, publish and subscribe (an HTTP auth hook answered from the
    enforcement core, security/enforcement/): nothing is written or reloaded, a change of desired state is in force
    for every new question at once. What is left to do is what a hook cannot: end the live sessions whose rights
    changed, forget what a revoked identity left behind, and prove the broker asks (design.md's verbs)."""

    name: str = "hook"
    # What the broker can and cannot do (``capabilities``). Its MQTT listener, where the console's own clients (the
    # canary, the verifier) log in, is MQTT_HOST:MQTT_PORT as for any broker.
    capability_table: dict = {}

    def __init__(self, *, host: str | None = None, port: int | None = None, timeout: float | None = None):
        self.host = host or settings.MQTT_HOST
        self.port = port or settings.MQTT_PORT
        self.timeout = timeout or settings.MQTT_PROBE_TIMEOUT

    def capabilities(self) -> dict:
        """What this broker can and cannot do (refusal form, kick, MQTT 5, TLS client certificates, ...)."""
        return dict(self.capability_table)

    def connect_code(self, username: str, password: str) -> int:
        """The CONNACK code an MQTT login gets from the broker (0: accepted). Raises BrokerUnavailable."""
        return connect_code(self.host, self.port, username=username, password=password, timeout=self.timeout)

    def loaded_probe_password(self, probe_secret: str) -> str:
        """The probe's password as the broker checks it: the hook asks the core each time, so it is the secret itself
        (no generations, nothing loaded)."""
        return probe_secret

    def probe(self) -> ProbeResult:
        """The canary: the console's probe identity logs in with its secret (the hook must say allow) and with a
        random one (the hook must say deny). Nothing is loaded: every question is asked afresh."""
        started = time.monotonic()
        result = ProbeResult(generation_loaded=True)
        allowed = self.connect_code(settings.MQTT_PROBE_USERNAME, settings.MQTT_PROBE_PASSWORD)
        refused = self.connect_code(settings.MQTT_PROBE_USERNAME, secrets.token_urlsafe(24))
        result.allowed_delivered = allowed == 0
        result.refused_credential_refused = refused != 0
        result.ok = result.allowed_delivered and result.refused_credential_refused
        if not result.ok:
            result.error = f"canary through the hook: own secret answered {allowed}, a random one {refused}"
        result.duration_ms = ms_since(started)
        return result

    def events(self, after: str = "$", *, count: int = 1000) -> list[hook_events.BrokerEvent]:
        """What the hook refused since the event id ``after`` ("$": nothing yet, "0": all kept), oldest first: the
        broker's own word on authentication failures, denied publishes and subscribes and client-id misuse."""
        if after == "$":
            return []
        return hook_events.read(after, count=count)

    def events_start(self) -> str:
        """Where a reader that wants only what comes next begins."""
        return hook_events.latest_id()

    @abc.abstractmethod
    def apply(self, client_ids: list[str]) -> ApplyResult:
        """Make the broker enforce the changed identities: end their live sessions (a live connection keeps the
        rights it was granted), then the canary. Raises BrokerUnavailable when the broker cannot be reached."""

    @abc.abstractmethod
    def verify_action(self, *, action: str, client_id: str) -> tuple[bool, dict]:
        """Is ``action`` (revoke, quarantine, reinstate) what the broker enforces for ``client_id`` now?
        Returns (ok, evidence)."""

    @abc.abstractmethod
    def disconnect(self, usernames: list[str]) -> dict[str, str]:
        """End every live session of these identities, wherever they are connected."""

    @abc.abstractmethod
    def purge(self, usernames: list[str]) -> dict[str, str]:
        """Forget the queued messages these identities' sessions left on the broker."""
