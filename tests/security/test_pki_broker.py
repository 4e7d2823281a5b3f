"""Mutual TLS on the real Mosquitto started from the rendered config: judged by what is delivered and refused.

Devices get their certificates through the console's API (CSR) exactly as firmware would; the broker trusts the
issuing chain, maps the certificate's CN to the username and client id, and refuses revoked, expired and foreign
certificates. A session already open with a revoked certificate is cut off (docs/pki.md)."""

import datetime as dt
import uuid

import pytest
from django.conf import settings
from rest_framework.test import APIClient

from security import services
from security.models import DeviceCertificate
from security.pki import services as pki
from security.pki.sessions import device_sessions_cut_off
from tests.factories import DeviceFactory
from tests.security.pki_helpers import csr_for, foreign_ca_certificate, key_pem, sign_with_console_ca
from tests.support.broker import ConsoleClients, MqttClient, TlsFiles, apply_now

pytestmark = [pytest.mark.integration, pytest.mark.django_db]


def api_issue(user, client_id: str) -> tuple[str, str, str]:
    """(key PEM, certificate PEM, chain PEM): the device makes its key and CSR; the console signs."""
    api = APIClient()
    api.force_authenticate(user)
    key, csr = csr_for(client_id)
    response = api.post(f"/api/v1/devices/{client_id}/certificates/", {"csr": csr}, format="json")
    assert response.status_code == 201, response.content
    return key_pem(key), response.json()["certificate"], response.json()["chain"]


@pytest.fixture
def tls(mosquitto, tmp_path):
    """Open TLS and plain clients against the test broker; all closed at the end."""
    clients = []
    chain = pki.ca_chain_pem()

    def device(client_id: str, key: str, cert: str, *, as_client_id: str | None = None, chain_pem: str = chain):
        files = TlsFiles(ca_chain=chain_pem, cert=cert, key=key, directory=tmp_path / "tls")
        client = MqttClient(settings.MQTT_TLS_PORT, client_id=as_client_id or client_id, tls=files, host="localhost")
        clients.append(client)
        return client

    def consumer():
        """The console: reads as the consumer identity, sends to devices as the commander identity."""
        client = ConsoleClients(mosquitto.port)
        clients.append(client)
        assert client.connect() == 0
        return client

    yield {"device": device, "consumer": consumer, "broker": mosquitto}
    for client in clients:
        client.close()


def test_rendered_config_opens_a_tls_listener_that_requires_certificates(mosquitto):
    config = (mosquitto.dir / "mosquitto.conf").read_text()
    for line in (
        f"listener {settings.MQTT_TLS_PORT} {settings.MQTT_HOST}",
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        "tls_version tlsv1.2",
        f"crlfile {mosquitto.dir}/crl.pem",
    ):
        assert line in config
    # The broker's private key is on disk for Mosquitto only: mode 0600.
    assert (mosquitto.dir / "server.key").stat().st_mode & 0o777 == 0o600
    assert "Opening ipv4 listen socket on port " + str(settings.MQTT_TLS_PORT) in mosquitto.log()


def test_device_with_a_console_issued_certificate_publishes_and_receives_on_its_own_topics(tls, operator):
    DeviceFactory(client_id="device-cert-a")
    key, cert, _chain = api_issue(operator, "device-cert-a")
    apply_now()
    consumer = tls["consumer"]()
    consumer.subscribe(f"{settings.MQTT_TOPIC_TX_PREFIX}/+/telemetry")
    device = tls["device"]("device-cert-a", key, cert)
    assert device.connect_outcome() == "connected"
    device.subscribe(f"{settings.MQTT_TOPIC_RX_PREFIX}/device-cert-a/command")
    nonce = uuid.uuid4().hex
    device.publish(f"{settings.MQTT_TOPIC_TX_PREFIX}/device-cert-a/telemetry", f"t {nonce}")
    assert consumer.wait_for(lambda msgs: any(m.payload == f"t {nonce}".encode() for m in msgs))
    consumer.publish(f"{settings.MQTT_TOPIC_RX_PREFIX}/device-cert-a/command", f"c {nonce}")
    assert device.wait_for(lambda msgs: any(m.payload == f"c {nonce}".encode() for m in msgs))
    # The broker saw the certificate's CN as the username.
    assert "u'device-cert-a'" in tls["broker"].log()


def test_a_certificate_for_device_a_cannot_act_as_device_b(tls, operator):
    DeviceFactory(client_id="device-cert-a")
    DeviceFactory(client_id="device-cert-b")
    key_a, cert_a, _ = api_issue(operator, "device-cert-a")
    key_b, cert_b, _ = api_issue(operator, "device-cert-b")
    apply_now()
    consumer = tls["consumer"]()
    consumer.subscribe(f"{settings.MQTT_TOPIC_TX_PREFIX}/+/telemetry")
    b = tls["device"]("device-cert-b", key_b, cert_b)
    assert b.connect_outcome() == "connected"
    # A asks for B's client id: the broker uses the certificate's CN instead, so B's session is not taken over.
    a = tls["device"]("device-cert-a", key_a, cert_a, as_client_id="device-cert-b")
    assert a.connect_outcome() == "connected"
    a.subscribe(f"{settings.MQTT_TOPIC_RX_PREFIX}/device-cert-b/command", f"{settings.MQTT_TOPIC_RX_PREFIX}/+/command")
    nonce = uuid.uuid4().hex
    forged = a.publish(f"{settings.MQTT_TOPIC_TX_PREFIX}/device-cert-b/telemetry", f"forged {nonce}")
    assert a.puback.get(forged.mid) == 0x87  # MQTT 5: the broker answers "not authorized" and routes nothing
    consumer.publish(f"{settings.MQTT_TOPIC_RX_PREFIX}/device-cert-b/command", f"for-b {nonce}")
    b.subscribe(f"{settings.MQTT_TOPIC_RX_PREFIX}/device-cert-b/command")
    consumer.publish(f"{settings.MQTT_TOPIC_RX_PREFIX}/device-cert-b/command", f"for-b-2 {nonce}")
    assert b.wait_for(lambda msgs: any(m.payload == f"for-b-2 {nonce}".encode() for m in msgs))
    assert f"forged {nonce}".encode() not in consumer.payloads()
    assert not any(nonce.encode() in p for p in a.payloads()), a.topics()
    assert b.is_connected
    assert "as device-cert-a (" in tls["broker"].log()


def test_revoked_certificate_is_refused_and_its_live_session_is_cut_off(tls, operator, support):
    device = DeviceFactory(client_id="device-cert-r")
    key, cert, _ = api_issue(operator, "device-cert-r")
    apply_now()
    consumer = tls["consumer"]()
    consumer.subscribe(f"{settings.MQTT_TOPIC_TX_PREFIX}/+/telemetry")
    live = tls["device"]("device-cert-r", key, cert)
    assert live.connect_outcome() == "connected"

    api = APIClient()
    api.force_authenticate(support)
    record = DeviceCertificate.objects.get(device=device)
    response = api.post(
        f"/api/v1/devices/device-cert-r/certificates/{record.serial}/revoke/", {"reason": "key leaked"}, format="json"
    )
    assert response.status_code == 200, response.content
    assert response.json()["status"] == "revoked"
    apply_now()  # what the enforcement task does: new CRL and ACL, SIGHUP, canary

    # Mosquitto does not re-check a connected TLS client on reload: the session is still open, but the ACL deny
    # (this device has no other certificate and no password) already stops its traffic.
    nonce = uuid.uuid4().hex
    after = live.publish(f"{settings.MQTT_TOPIC_TX_PREFIX}/device-cert-r/telemetry", f"after revoke {nonce}")
    assert live.puback.get(after.mid) == 0x87  # MQTT 5: the broker answers "not authorized" and routes nothing
    assert f"after revoke {nonce}".encode() not in consumer.payloads()

    # The cut-off (the task the revocation enqueues) takes the session over: the old connection is closed.
    assert device_sessions_cut_off(client_ids=["device-cert-r"]) == {"device-cert-r": 0}
    assert live.wait_disconnected(3.0)
    # And the revoked certificate cannot come back: the CRL refuses the handshake.
    again = tls["device"]("device-cert-r", key, cert)
    assert again.connect_outcome().startswith("refused")


def test_after_reissue_the_old_certificates_session_is_cut_off_and_the_new_one_works(tls, operator, support):
    DeviceFactory(client_id="device-cert-n")
    old_key, old_cert, _ = api_issue(operator, "device-cert-n")
    apply_now()
    old = tls["device"]("device-cert-n", old_key, old_cert)
    assert old.connect_outcome() == "connected"
    new_key, new_cert, _ = api_issue(operator, "device-cert-n")
    pki.certificate_revoke(
        actor=support, certificate=DeviceCertificate.objects.get(serial=_serial(old_cert)), reason="superseded"
    )
    apply_now()
    assert old.is_connected  # the caveat: a reload alone leaves the session with the revoked certificate open
    device_sessions_cut_off(client_ids=["device-cert-n"])
    assert old.wait_disconnected(3.0)
    assert tls["device"]("device-cert-n", old_key, old_cert).connect_outcome().startswith("refused")
    new = tls["device"]("device-cert-n", new_key, new_cert)
    assert new.connect_outcome() == "connected"


def test_an_expired_certificate_is_refused(tls):
    DeviceFactory(client_id="device-cert-old")
    now = dt.datetime.now(dt.UTC)
    key, cert = sign_with_console_ca(
        "device-cert-old", not_before=now - dt.timedelta(days=10), not_after=now - dt.timedelta(days=1)
    )
    still_valid_key, still_valid = sign_with_console_ca(
        "device-cert-old", not_before=now - dt.timedelta(days=1), not_after=now + dt.timedelta(days=1)
    )
    apply_now()
    assert tls["device"]("device-cert-old", key, cert).connect_outcome().startswith("refused")
    # The same CA and device with a current validity period is accepted: the date is what was refused.
    assert tls["device"]("device-cert-old", still_valid_key, still_valid).connect_outcome() == "connected"


def test_a_certificate_from_another_ca_is_refused(tls):
    DeviceFactory(client_id="device-cert-x")
    key, cert_and_issuer = foreign_ca_certificate("device-cert-x")
    apply_now()
    assert tls["device"]("device-cert-x", key, cert_and_issuer).connect_outcome().startswith("refused")


def test_without_a_certificate_the_tls_listener_refuses(tls):
    files_client = MqttClient(
        settings.MQTT_TLS_PORT,
        client_id="anon",
        host="localhost",
        tls=TlsFiles(ca_chain=pki.ca_chain_pem(), directory=tls["broker"].dir / "anon"),
    )
    try:
        assert files_client.connect_outcome().startswith("refused")
    finally:
        files_client.close()


def test_device_revoke_takes_a_certificate_device_off_the_broker(tls, operator, support):
    """Even before the status-change hook revokes its certificates, a revoked device's certificates are on the CRL
    and its username is denied."""
    device = DeviceFactory(client_id="device-cert-d")
    key, cert, _ = api_issue(operator, "device-cert-d")
    apply_now()
    consumer = tls["consumer"]()
    consumer.subscribe(f"{settings.MQTT_TOPIC_TX_PREFIX}/+/telemetry")
    live = tls["device"]("device-cert-d", key, cert)
    assert live.connect_outcome() == "connected"
    services.device_revoke(actor=support, device=device, reason="stolen")
    apply_now()
    nonce = uuid.uuid4().hex
    denied = live.publish(f"{settings.MQTT_TOPIC_TX_PREFIX}/device-cert-d/telemetry", nonce)
    assert live.puback.get(denied.mid) == 0x87  # MQTT 5: the broker answers "not authorized" and routes nothing
    assert nonce.encode() not in consumer.payloads()
    assert tls["device"]("device-cert-d", key, cert).connect_outcome().startswith("refused")


def test_quarantined_certificate_device_keeps_only_the_repair_path(tls, operator, support):
    device = DeviceFactory(client_id="device-cert-q")
    key, cert, _ = api_issue(operator, "device-cert-q")
    services.device_quarantine(actor=support, device=device, reason="odd traffic")
    apply_now()
    consumer = tls["consumer"]()
    consumer.subscribe(f"{settings.MQTT_TOPIC_TX_PREFIX}/+/telemetry", f"{settings.MQTT_TOPIC_TX_PREFIX}/+/ack")
    live = tls["device"]("device-cert-q", key, cert)
    assert live.connect_outcome() == "connected"
    nonce = uuid.uuid4().hex
    live.publish(f"{settings.MQTT_TOPIC_TX_PREFIX}/device-cert-q/telemetry", f"t {nonce}")
    live.publish(f"{settings.MQTT_TOPIC_TX_PREFIX}/device-cert-q/ack", f"a {nonce}")
    # One client's publishes are routed in order: had the telemetry been allowed, it would have arrived before the ack.
    assert consumer.wait_for(lambda msgs: any(m.payload == f"a {nonce}".encode() for m in msgs))
    assert f"t {nonce}".encode() not in consumer.payloads()


def _serial(cert_pem: str) -> str:
    from security.pki.ca import load_cert

    return format(load_cert(cert_pem).serial_number, "X")
