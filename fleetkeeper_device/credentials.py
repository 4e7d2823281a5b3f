"""The device's credentials and where they are kept.

During a rotation a device holds two secrets: ``current`` (the newest, received on
``rx/<id>/credentials``) and ``previous`` (the one that worked before). It connects with ``current``
and, if the broker refuses it (the console has not switched the broker yet, or the switch failed),
with ``previous``. Once ``current`` is accepted, ``previous`` is forgotten.

A store only has to load and save a ``CredentialSet``; ``FileCredentialStore`` writes one JSON file
atomically with mode 0600, ``MemoryCredentialStore`` keeps it in memory (tests, the simulator).
Firmware teams plug in their secure element or flash partition by implementing the same two methods.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class Credential:
    secret: str = field(repr=False)
    credential_id: str = ""
    received_at: float | None = None


@dataclass(frozen=True)
class CredentialSet:
    current: Credential | None = None
    previous: Credential | None = None
    # X.509 (used with TLS client authentication): PEM strings.
    certificate_pem: str | None = None
    private_key_pem: str | None = field(default=None, repr=False)
    chain_pem: str | None = None
    # A key made for a CSR that has not been answered with a certificate yet.
    pending_key_pem: str | None = field(default=None, repr=False)
    pending_request_id: str | None = None

    def rotated(self, new: Credential, *, proven: Credential | None = None) -> CredentialSet:
        """Take ``new`` as current. The previous slot keeps the secret most recently accepted by the
        broker (``proven``, the one the live session logged in with), else the old current: if a
        rotation arrives while the one before is still unconfirmed, the proven secret stays."""
        if self.current is not None and new.secret == self.current.secret:
            return self
        keep = proven or self.current or self.previous
        if keep is not None and keep.secret == new.secret:
            keep = None
        return dataclasses.replace(self, current=new, previous=keep)

    def confirmed(self) -> CredentialSet:
        """The broker accepted ``current``: the previous secret is of no further use."""
        return dataclasses.replace(self, previous=None)

    def to_json(self) -> dict:
        def cred(c: Credential | None) -> dict | None:
            return None if c is None else dataclasses.asdict(c)

        data = dataclasses.asdict(self)
        data["current"], data["previous"] = cred(self.current), cred(self.previous)
        return data

    @classmethod
    def from_json(cls, data: dict) -> CredentialSet:
        def cred(value: dict | None) -> Credential | None:
            return None if not value else Credential(**value)

        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["current"] = cred(values.get("current"))
        values["previous"] = cred(values.get("previous"))
        return cls(**values)


class CredentialStore(Protocol):
    def load(self) -> CredentialSet: ...

    def save(self, credentials: CredentialSet) -> None:
        """Must be durable when it returns: the device acks a rotation only after this."""


class MemoryCredentialStore:
    def __init__(self, credentials: CredentialSet | None = None, *, secret: str | None = None):
        if credentials is None:
            credentials = CredentialSet(current=Credential(secret) if secret else None)
        self._credentials = credentials
        self._lock = threading.Lock()

    def load(self) -> CredentialSet:
        with self._lock:
            return self._credentials

    def save(self, credentials: CredentialSet) -> None:
        with self._lock:
            self._credentials = credentials


class FileCredentialStore:
    """One JSON file, replaced atomically (write a temporary file, fsync, rename), mode 0600."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._lock = threading.Lock()

    def load(self) -> CredentialSet:
        with self._lock:
            try:
                return CredentialSet.from_json(json.loads(self.path.read_text()))
            except FileNotFoundError:
                return CredentialSet()

    def save(self, credentials: CredentialSet) -> None:
        with self._lock:
            write_private_json(self.path, credentials.to_json())


def write_private_json(path: Path, data: dict) -> None:
    """Replace ``path`` atomically with ``data`` as JSON, mode 0600, durable when it returns (temporary file in the
    same directory, fsync, rename). Also used for sealing.FileCounterStore."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
