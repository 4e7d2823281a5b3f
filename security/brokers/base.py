"""The broker-adapter interface (design.md, "Broker adapters").

One small interface, implementations chosen by settings.MQTT_BROKER_ADAPTER: MosquittoFiles (default, files +
SIGHUP), later MosquittoDynsec (small installations) and HttpAuthHook (clustered brokers). The services speak
only to this interface, so a clustered broker replaces Mosquitto without touching them.
"""

from __future__ import annotations

import abc
from dataclasses import asdict, dataclass, field

from .render import RenderedPolicy


class BrokerError(Exception):
    """Something went wrong enforcing the policy."""


class BrokerUnavailable(BrokerError):
    """The broker cannot be reached or signalled right now (down, restarting, no pid file). Transient: the change
    stays pending and is applied by a retry or the reconcile job."""


class BrokerRejected(BrokerError):
    """The rendered content was refused before it reached the broker (validation), or a probe showed the broker
    does not enforce what was intended. Not transient: needs a person."""


@dataclass(frozen=True)
class BrokerProcess:
    pid: int
    started: str  # an opaque start marker (Linux: /proc/<pid>/stat start time); changes when the broker restarts


@dataclass
class ProbeResult:
    """What the canary saw. ``ok`` only when every check passed."""

    ok: bool = False
    generation_loaded: bool = False
    refused_credential_refused: bool = False
    allowed_delivered: bool = False
    forbidden_delivered: bool = False
    duration_ms: float = 0.0
    error: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class ApplyResult:
    digest: str
    written: bool
    reloaded: bool
    process: BrokerProcess | None
    probe: ProbeResult | None
    drift: dict = field(default_factory=dict)


@dataclass(frozen=True)
class LoadedFiles:
    """The files the broker loads (on disk): None where a file is missing."""

    config: str | None
    passwd: str | None
    acl: str | None


class BrokerAdapter(abc.ABC):
    name: str = "broker"

    @abc.abstractmethod
    def loaded_files(self) -> LoadedFiles:
        """What the broker currently loads (for drift detection and the policy page)."""

    @abc.abstractmethod
    def process(self) -> BrokerProcess | None:
        """The running broker, or None when it is not running."""

    @abc.abstractmethod
    def write(self, policy: RenderedPolicy) -> bool:
        """Put the desired policy where the broker reads it, atomically. True if anything changed."""

    @abc.abstractmethod
    def reload(self) -> None:
        """Make the broker load what ``write`` put in place. Raises BrokerUnavailable."""

    @abc.abstractmethod
    def probe(self, policy: RenderedPolicy) -> ProbeResult:
        """The canary: is ``policy`` what the broker enforces? Raises BrokerUnavailable when unreachable."""

    def apply(self, policy: RenderedPolicy, *, force_reload: bool = False) -> ApplyResult:
        """Write, reload when needed, and probe. A broker that is not running gets the files (it loads them when
        it starts) and BrokerUnavailable is raised, so the caller keeps its changes pending."""
        written = self.write(policy)
        process = self.process()
        if process is None:
            raise BrokerUnavailable("The broker is not running (no live process behind its pid file).")
        reloaded = False
        if written or force_reload:
            self.reload()
            reloaded = True
        result = self.probe(policy)
        if not result.generation_loaded and not reloaded:
            # The files are right but the broker runs an older generation (e.g. it was started before the files were
            # fixed, or someone signalled it mid-write): reload once more and look again.
            self.reload()
            reloaded = True
            result = self.probe(policy)
        return ApplyResult(
            digest=policy.digest, written=written, reloaded=reloaded, process=self.process(), probe=result
        )
