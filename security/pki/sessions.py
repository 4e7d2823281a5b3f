"""Cutting off a TLS session that is still open with a revoked certificate.

Mosquitto 2.0 checks the CRL only at the handshake: after the reload, a session already connected with the
revoked certificate stays connected (mosquitto-notes.md). The TLS listener uses the certificate's CN as the client
id, so the console can take that session over: it connects once with a short-lived certificate for the same CN
(minted in memory, never stored, valid for minutes) and disconnects. The broker closes the old session ("already
connected, closing old connection"); when the holder of the revoked certificate reconnects, the CRL refuses it.
A device with a valid certificate simply reconnects. docs/pki.md has the details."""

from __future__ import annotations

import datetime as dt
import os
import ssl
import tempfile
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from django.conf import settings

from security.audit import audit_record
from security.brokers.base import BrokerUnavailable
from security.brokers.mqtt_client import mqtt_close, mqtt_step

from . import ca as pki_ca
from .csr import device_cert_sign

TAKEOVER_LIFETIME = dt.timedelta(minutes=5)


def _takeover(*, client_id: str, cert_pem: str, key_pem: str, chain_pem: str, timeout: float) -> int:
    """Connect as ``client_id`` over TLS, then disconnect: the CONNACK code (0 when the old session was replaced)."""
    with tempfile.TemporaryDirectory(prefix="fleetkeeper-takeover-") as tmp:
        cert_path, key_path = Path(tmp) / "c.pem", Path(tmp) / "k.pem"
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(key_pem)
        cert_path.write_text(cert_pem)
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=chain_pem)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(cert_path, key_path)
    # Clean session off: the device's persistent session (queued commands) survives the takeover.
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311, clean_session=False
    )
    client.tls_set_context(context)
    outcome: list[int] = []
    client.on_connect = lambda _c, _u, _f, reason, _p: outcome.append(reason.value)
    try:
        client.connect(settings.MQTT_HOST, settings.MQTT_TLS_PORT, keepalive=30)
    except OSError as exc:
        raise BrokerUnavailable(f"The broker's TLS listener does not answer ({exc}).") from exc
    deadline = time.monotonic() + timeout
    while not outcome and time.monotonic() < deadline:
        if mqtt_step(client, 0.01) not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_AGAIN):
            break
    code = outcome[0] if outcome else -1
    if code == 0:
        client.disconnect()
        mqtt_step(client, 0.05)
    mqtt_close(client)
    return code


def device_sessions_cut_off(*, client_ids: list[str], timeout: float = 3.0) -> dict:
    """Apply pending enforcement (the new CRL and ACL are loaded once the probe confirms), then take over every
    named client id's session. Runs as a task after a certificate revocation; a service, audited per device."""
    from security.services import enforcement_apply

    from .services import _issuing_key, pki_ensure

    result = enforcement_apply()
    if result is not None and result.probe is not None and not result.probe.ok:
        raise BrokerUnavailable(f"the broker has not confirmed the new policy: {result.probe.error}")
    issuing = pki_ensure()
    issuer_key = _issuing_key(issuing)
    issuer_cert = pki_ca.load_cert(issuing.certificate_pem)
    chain = issuing.certificate_pem + issuing.chain_pem
    outcome = {}
    for client_id in dict.fromkeys(client_ids):
        key = pki_ca.new_ec_key()
        start = pki_ca.now() - dt.timedelta(minutes=1)
        leaf = device_cert_sign(
            issuer_key=issuer_key,
            issuer_cert=issuer_cert,
            client_id=client_id,
            public_key=key.public_key(),
            not_before=start,
            not_after=start + TAKEOVER_LIFETIME,
        )
        code = _takeover(
            client_id=client_id,
            cert_pem=pki_ca.cert_pem(leaf.certificate),
            key_pem=pki_ca.plain_key_pem(key),
            chain_pem=chain,
            timeout=timeout,
        )
        del key
        outcome[client_id] = code
        audit_record(
            actor=None,
            action="certificate.session_cut_off",
            object_type="device",
            object_id=client_id,
            after={"takeover_connack": code, "takeover_serial": format(leaf.serial, "X"), "lifetime_s": 300},
        )
    return outcome
