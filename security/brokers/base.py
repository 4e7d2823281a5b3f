"""The broker-adapter interface (design.md, "Broker adapters").

One small interface, implementations chosen by settings.MQTT_BROKER_ADAPTER: MosquittoFiles (default, files +
SIGHUP), later MosquittoDynsec (small installations) and HttpAuthHook (clustered brokers). The services speak
only to this interface, so a clustered broker replaces Mosquitto without touching them.
"""

from __future__ import annotations

import abc
import time
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
    # Where the time went (ms, and the wall-clock moment the reload was signalled): the revocation benchmark reads
    # them from the settled outbox rows to break a revocation's latency down per step (docs/benchmarks.md).
    timings: dict = field(default_factory=dict)


@dataclass(frozen=True)
class DerivedPolicy(RenderedPolicy):
    """A policy derived from the files the broker loads by removing and adding whole password lines (the revocation
    fast path, the session purge), instead of rendering the fleet again.

    ``base_digest`` is the digest of the files it was derived from, which the caller proved equal to what the last
    successful apply wrote and validated. Removing valid lines from a valid file leaves a valid file, so only
    ``new_passwd_lines`` (the probe's line for the new generation, a purge's one-time lines) need validating before
    the write; ``passwd_bytes`` is what gets written (no re-encoding of 100,000 lines). ``acl_changed`` is False when
    the ACL is the loaded one, byte for byte (the config never changes here)."""

    base_digest: str = ""
    passwd_bytes: bytes = b""
    new_passwd_lines: tuple[str, ...] = ()
    acl_changed: bool = False

    def passwd_text(self) -> str:
        """``passwd`` is left empty (decoding 100,000 lines costs ~12 ms on the revocation path): this decodes."""
        return self.passwd_bytes.decode()

    def files(self) -> dict[str, str]:
        return {"mosquitto.conf": self.config, "passwd": self.passwd_text(), "acl": self.acl}


@dataclass(frozen=True)
class LoadedBytes:
    """The files the broker loads, as bytes (one read each; None where a file is missing)."""

    config: bytes | None
    passwd: bytes | None
    acl: bytes | None

    def complete(self) -> bool:
        return bool(self.config and self.passwd and self.acl)


def files_digest_bytes(*, config: bytes, passwd: bytes, acl: bytes) -> str:
    """``render.files_digest`` over bytes, without concatenating 100,000 lines into a new string."""
    import hashlib

    digest = hashlib.sha256(config)
    for part in (b"\0", acl, b"\0", passwd):
        digest.update(part)
    return digest.hexdigest()


def ms_since(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)


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

    def loaded_bytes(self) -> LoadedBytes:
        """The same, as bytes (adapters that keep files override this to read each file once, undecoded)."""
        loaded = self.loaded_files()
        return LoadedBytes(
            *(None if text is None else text.encode() for text in (loaded.config, loaded.passwd, loaded.acl))
        )

    def loaded_bytes_matching(self, digest: str) -> LoadedBytes | None:
        """The loaded files when their digest is ``digest`` (what the last successful apply wrote), else None."""
        loaded = self.loaded_bytes()
        if not loaded.complete():
            return None
        if files_digest_bytes(config=loaded.config, passwd=loaded.passwd, acl=loaded.acl) != digest:
            return None
        return loaded

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

    def apply(self, policy: RenderedPolicy, *, force_reload: bool = False, before_reload=None) -> ApplyResult:
        """Write, reload when needed, and probe. A broker that is not running gets the files (it loads them when
        it starts) and BrokerUnavailable is raised, so the caller keeps its changes pending.

        ``before_reload`` (optional) is called right before the reload signal, e.g. to make sure a session watcher
        is subscribed to the broker's log before the reload drops anyone."""
        timings: dict = {}
        started = time.monotonic()
        written = self.write(policy)
        timings["write_ms"] = ms_since(started)
        process = self.process()
        if process is None:
            raise BrokerUnavailable("The broker is not running (no live process behind its pid file).")
        reloaded = False
        if written or force_reload:
            if before_reload is not None:
                before_reload()
            timings["signalled_at"] = time.time()
            self.reload()
            reloaded = True
        probe_started = time.monotonic()
        result = self.probe(policy)
        if not result.generation_loaded and not reloaded:
            # The files are right but the broker runs an older generation (e.g. it was started before the files were
            # fixed, or someone signalled it mid-write): reload once more and look again.
            if before_reload is not None:
                before_reload()
            timings["signalled_at"] = time.time()
            self.reload()
            reloaded = True
            result = self.probe(policy)
        timings["probe_ms"] = ms_since(probe_started)
        return ApplyResult(
            digest=policy.digest,
            written=written,
            reloaded=reloaded,
            process=self.process(),
            probe=result,
            timings=timings,
        )
