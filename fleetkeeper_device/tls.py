"""TLS for the device connection, pluggable: plain TCP today, server-verified TLS and client
certificates when the console's PKI issues them.

``DeviceClient(tls=...)`` takes any callable ``(CredentialSet) -> ssl.SSLContext``; it is called for
each new MQTT client the device builds (at start, and after a new certificate was installed), so a
renewed certificate is used from the next connection on. ``TLSOptions`` is the ready-made one.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

from .credentials import CredentialSet

TLSContextFactory = Callable[[CredentialSet], ssl.SSLContext]


@dataclass(frozen=True)
class TLSOptions:
    """Verify the broker against ``ca_file`` (or the system store); present the device's installed
    certificate and key when ``client_certificate`` is on and the store holds them."""

    ca_file: str | None = None
    client_certificate: bool = True
    minimum_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2

    def __call__(self, credentials: CredentialSet) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file)
        context.minimum_version = self.minimum_version
        if self.client_certificate and credentials.certificate_pem and credentials.private_key_pem:
            load_client_certificate(context, credentials)
        return context


def load_client_certificate(context: ssl.SSLContext, credentials: CredentialSet) -> None:
    """``ssl`` only loads key pairs from files: write them to a private temporary directory, load, delete."""
    with tempfile.TemporaryDirectory(prefix="fleetkeeper-device-tls-") as directory:
        cert_path = os.path.join(directory, "cert.pem")
        key_path = os.path.join(directory, "key.pem")
        with open(os.open(cert_path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as handle:
            handle.write(credentials.certificate_pem or "")
            if credentials.chain_pem:
                handle.write(credentials.chain_pem)
        with open(os.open(key_path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as handle:
            handle.write(credentials.private_key_pem or "")
        context.load_cert_chain(cert_path, key_path)
