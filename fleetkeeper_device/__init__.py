"""Fleetkeeper's device-side library: the device half of the protocol, for firmware teams and the simulator.

No Django here, on purpose: only paho-mqtt 2 and the standard library, plus ``cryptography`` for
certificate renewal and firmware signature checks. See docs/device-protocol.md.
"""

from .backoff import Backoff
from .client import CommandRejected, DeviceClient, DeviceEvents
from .credentials import Credential, CredentialSet, CredentialStore, FileCredentialStore, MemoryCredentialStore
from .dedup import Deduplicator
from .protocol import PROTOCOL_VERSION, ProtocolError, decode, encode
from .reactor import Reactor
from .tls import TLSOptions
from .topics import DEFAULT_SCHEME, TopicScheme

__all__ = [
    "PROTOCOL_VERSION",
    "Backoff",
    "CommandRejected",
    "Credential",
    "CredentialSet",
    "CredentialStore",
    "DEFAULT_SCHEME",
    "Deduplicator",
    "DeviceClient",
    "DeviceEvents",
    "FileCredentialStore",
    "MemoryCredentialStore",
    "ProtocolError",
    "Reactor",
    "TLSOptions",
    "TopicScheme",
    "decode",
    "encode",
]
