"""Certificate rotation (issue 7, "Certificates"): renew -> CSR -> certificate -> ack -> old certificate revoked.

The first tests drive the console side with the device library's own message handlers (a DeviceClient whose MQTT
publishes are captured), so the messages are exactly what firmware sends and receives. The end-to-end test at the
bottom runs a TLS device against the real broker with a real worker and the MQTT consumer."""

from __future__ import annotations

import datetime as dt
import secrets

import pytest
from django.utils import timezone

from fleetkeeper_device import protocol
from security.models import AuditEvent, CredentialRotation, DeviceCertificate
from security.pki import services as pki
from security.rotation import certificates
from tests.factories import DeviceFactory
from tests.security.pki_helpers import csr_for

pytestmark = pytest.mark.django_db


@pytest.fixture
def sent(monkeypatch, django_capture_on_commit_callbacks):
    """Messages the console sends to devices (client id, decoded message), instead of the broker."""
    out: list[tuple[str, dict]] = []
    raw: list[bytes] = []

    def publish_many(messages):
        for client_id, payload in messages:
            raw.append(payload)
            out.append((client_id, protocol.decode(payload)))
        return [True] * len(messages)

    monkeypatch.setattr(certificates, "_publish_many", publish_many)
    monkeypatch.setattr(certificates, "RAW_FOR_TESTS", raw, raising=False)
    original = certificates.csr_received

    def csr_received(**kwargs):  # what the signing commits is sent after the commit
        with django_capture_on_commit_callbacks(execute=True):
            return original(**kwargs)

    monkeypatch.setattr(certificates, "csr_received", csr_received)
    monkeypatch.setattr(
        certificates, "_enqueue_send", lambda rotation_id: certificates.certificate_send(rotation_id=rotation_id)
    )
    return out


def certificate_device(operator, client_id: str = "device-rot-c1"):
    device = DeviceFactory(client_id=client_id)
    _key, csr = csr_for(client_id)
    issued = pki.certificate_issue_from_csr(actor=operator, device=device, csr_pem=csr)
    return device, issued.record


def open_rotation(device, old=None, state="delivered") -> CredentialRotation:
    return CredentialRotation.objects.create(
        device=device,
        client_id=device.client_id,
        kind=CredentialRotation.Kind.CERTIFICATE,
        state=state,
        command_id=f"rot-{secrets.token_hex(6)}",
        old_certificate=old,
    )


def test_renew_is_sent_on_the_credentials_channel_and_remembers_the_old_certificate(operator, sent):
    device, old = certificate_device(operator)
    rotation = open_rotation(device, old=None, state="pending")
    certificates.certificate_renew_deliver(rotation)
    assert sent == [(device.client_id, sent[0][1])]
    message = sent[0][1]
    assert message["type"] == "certificate_renew" and message["id"] == rotation.command_id
    assert message["key_type"] == "ec-p256"
    rotation.refresh_from_db()
    assert rotation.old_certificate_id == old.pk


def test_many_renewals_go_out_on_one_connection_and_a_resend_gets_a_fresh_id(operator, monkeypatch):
    calls = []

    def publish_many(messages):
        calls.append(messages)
        return [i != 2 for i in range(len(messages))]  # the broker did not acknowledge the third

    monkeypatch.setattr(certificates, "_publish_many", publish_many)
    rows = [open_rotation(certificate_device(operator, f"device-rot-m{i}")[0], state="pending") for i in range(3)]
    outcome = certificates.certificate_renew_deliver_many(rotation_ids=[r.pk for r in rows])
    assert outcome == {"sent": 2, "failed": 1} and len(calls) == 1 and len(calls[0]) == 3
    states = [CredentialRotation.objects.get(pk=r.pk) for r in rows]
    assert [r.state for r in states] == ["delivered", "delivered", "pending"]
    assert "did not acknowledge" in states[2].last_error and states[0].delivered_at is not None
    first_id = states[0].command_id
    certificates.certificate_renew_deliver_many(rotation_ids=[rows[0].pk])  # the re-send (device came back)
    again = CredentialRotation.objects.get(pk=rows[0].pk)
    assert again.command_id != first_id and again.attempts == 2
    assert protocol.decode(calls[-1][0][1])["id"] == again.command_id


def test_a_valid_csr_is_signed_sent_and_the_ack_confirms(operator, sent, settings):
    settings.ROTATION_CERTIFICATE_GRACE_SECONDS = 3600
    device, old = certificate_device(operator)
    rotation = open_rotation(device, old=old)
    key, csr = csr_for(device.client_id)
    outcome = certificates.csr_received(
        client_id=device.client_id, message={"id": "csr-1", "ts": 1.0, "ref": rotation.command_id, "csr": csr}
    )
    assert outcome == "signed"
    rotation.refresh_from_db()
    new = rotation.new_certificate
    assert new is not None and new.pk != old.pk and new.status == "active"
    assert rotation.state == "delivered"
    (client_id, message) = sent[-1]
    assert client_id == device.client_id and message["type"] == "certificate"
    assert message["ref"] == rotation.command_id.removesuffix(".c") and message["id"] == rotation.command_id
    assert message["certificate"] == new.certificate_pem
    # The device acks the certificate: confirmed, the old certificate still valid until the grace ends.
    outcome = certificates.certificate_acked(
        client_id=device.client_id,
        message={"id": message["id"], "ts": 2.0, "command": "certificate", "status": "ok", "result": {"serial": "ab"}},
    )
    assert outcome == "confirmed"
    rotation.refresh_from_db()
    old.refresh_from_db()
    assert rotation.state == "confirmed" and rotation.confirmed_at is not None
    assert rotation.deadline > timezone.now() + dt.timedelta(minutes=59)
    assert old.status == "active"
    assert certificates.certificate_rotations_finish() == 0  # grace not over
    assert AuditEvent.objects.filter(action="rotation.confirm", object_id=device.client_id).exists()
    assert AuditEvent.objects.filter(action="rotation.certificate_signed", object_id=device.client_id).exists()


def test_after_the_grace_the_old_certificate_is_revoked_and_the_rotation_completes(operator, sent, settings):
    settings.ROTATION_CERTIFICATE_GRACE_SECONDS = 0
    device, old = certificate_device(operator)
    rotation = open_rotation(device, old=old)
    _key, csr = csr_for(device.client_id)
    certificates.csr_received(
        client_id=device.client_id, message={"id": "c", "ts": 1.0, "ref": rotation.command_id, "csr": csr}
    )
    rotation.refresh_from_db()
    certificates.certificate_acked(
        client_id=device.client_id,
        message={"id": rotation.command_id, "ts": 2.0, "command": "certificate", "status": "ok"},
    )
    assert certificates.certificate_rotations_finish() == 1
    rotation.refresh_from_db()
    old.refresh_from_db()
    assert rotation.state == "completed" and rotation.completed_at is not None
    assert old.status == "revoked" and "rotation" in old.reason
    assert rotation.new_certificate.status == "active"
    # The CRL the broker loads lists the old serial, not the new one.
    from cryptography import x509

    crl = x509.load_pem_x509_crl(pki.crl_current().encode())
    serials = {format(r.serial_number, "X") for r in crl}
    assert old.serial in serials and rotation.new_certificate.serial not in serials
    assert certificates.certificate_rotations_finish() == 0  # nothing twice


def test_a_csr_for_another_client_id_fails_the_rotation_and_signs_nothing(operator, sent):
    device, old = certificate_device(operator)
    rotation = open_rotation(device, old=old)
    _key, csr = csr_for("device-someone-else")
    outcome = certificates.csr_received(
        client_id=device.client_id, message={"id": "c", "ts": 1.0, "ref": rotation.command_id, "csr": csr}
    )
    assert outcome == "failed"
    rotation.refresh_from_db()
    assert rotation.state == "failed" and "CN" in rotation.last_error
    assert rotation.new_certificate_id is None
    assert DeviceCertificate.objects.filter(client_id=device.client_id).count() == 1
    assert sent == []


def test_a_csr_with_a_stale_ref_or_without_a_rotation_is_ignored(operator, sent):
    device, old = certificate_device(operator)
    _key, csr = csr_for(device.client_id)
    assert certificates.csr_received(client_id=device.client_id, message={"ref": "nothing", "csr": csr}) == "ignored"
    rotation = open_rotation(device, old=old)
    assert certificates.csr_received(client_id=device.client_id, message={"ref": "old-ref", "csr": csr}) == "ignored"
    rotation.refresh_from_db()
    assert rotation.state == "delivered" and rotation.new_certificate_id is None
    assert sent == []


def test_the_same_csr_twice_signs_once_and_resends_the_same_certificate(operator, sent):
    device, old = certificate_device(operator)
    rotation = open_rotation(device, old=old)
    _key, csr = csr_for(device.client_id)
    message = {"id": "c", "ts": 1.0, "ref": rotation.command_id, "csr": csr}
    assert certificates.csr_received(client_id=device.client_id, message=message) == "signed"
    assert certificates.csr_received(client_id=device.client_id, message=message) == "resent"
    assert DeviceCertificate.objects.filter(client_id=device.client_id).count() == 2  # the old one and one new
    first, second = ({k: v for k, v in m.items() if k != "ts"} for _, m in sent)
    assert first == second


def test_a_refused_certificate_fails_the_rotation_and_revokes_the_unused_certificate(operator, sent):
    device, old = certificate_device(operator)
    rotation = open_rotation(device, old=old)
    _key, csr = csr_for(device.client_id)
    certificates.csr_received(client_id=device.client_id, message={"ref": rotation.command_id, "csr": csr})
    rotation.refresh_from_db()
    outcome = certificates.certificate_acked(
        client_id=device.client_id,
        message={"id": rotation.command_id, "command": "certificate", "status": "rejected", "detail": "wrong key"},
    )
    assert outcome == "failed"
    rotation.refresh_from_db()
    old.refresh_from_db()
    assert rotation.state == "failed" and "wrong key" in rotation.last_error
    assert rotation.new_certificate.status == "revoked"
    assert old.status == "active"  # the device keeps working with what it has


def test_a_device_that_refuses_the_renew_fails_the_rotation(operator, sent):
    device, old = certificate_device(operator)
    rotation = open_rotation(device, old=old)
    outcome = certificates.certificate_acked(
        client_id=device.client_id,
        message={"id": rotation.command_id, "command": "certificate_renew", "status": "rejected", "detail": "no"},
    )
    assert outcome == "failed"
    rotation.refresh_from_db()
    assert rotation.state == "failed"


def test_the_device_library_completes_the_handover_with_the_console(operator, sent, settings):
    """The device half is fleetkeeper_device's DeviceClient: its renew handler makes the key and the CSR, its
    certificate handler checks and installs what the console signed."""
    from fleetkeeper_device.client import DeviceClient
    from fleetkeeper_device.credentials import CredentialSet, MemoryCredentialStore

    settings.ROTATION_CERTIFICATE_GRACE_SECONDS = 0
    device, old = certificate_device(operator, "device-rot-lib")
    rotation = open_rotation(device, old=old, state="pending")
    published: list[tuple[str, dict]] = []

    class FakeMqtt:
        def publish(self, topic, payload, qos=0):
            published.append((topic, protocol.decode(payload)))

    store = MemoryCredentialStore(CredentialSet(certificate_pem=old.certificate_pem, private_key_pem="x"))
    client = DeviceClient(device.client_id, host="127.0.0.1", credentials=store)
    client._mqtt = FakeMqtt()
    certificates.certificate_renew_deliver(rotation)
    assert client.handle_message("credentials", certificates.RAW_FOR_TESTS[-1]) == "ok"
    csr_message = next(m for t, m in published if t.endswith("/csr"))
    certificates.csr_received(client_id=device.client_id, message=csr_message)
    assert client.handle_message("credentials", certificates.RAW_FOR_TESTS[-1]) == "ok"
    ack = [m for t, m in published if t.endswith("/ack") and m["command"] == "certificate"][-1]
    assert certificates.certificate_acked(client_id=device.client_id, message=ack) == "confirmed"
    rotation.refresh_from_db()
    assert store.load().certificate_pem == rotation.new_certificate.certificate_pem
    assert client.certificate_serial == rotation.new_certificate.serial.lower()
    assert certificates.certificate_rotations_finish() == 1
    client.reactor.close()


# --- end to end: a TLS device, the real broker, a real worker running the consumer ----------------------------------

from tests.security.test_rotation import (  # noqa: E402  (H2's fixtures: the worker with the consumer, the broker)
    broker,  # noqa: F401
    roles_present,  # noqa: F401
    rotation_worker,  # noqa: F401
)
from tests.support.waiting import wait_until  # noqa: E402


def _applied(worker) -> None:
    from security.models import EnforcementChange

    last = EnforcementChange.objects.order_by("-pk").first()
    assert last is None or wait_until(
        lambda: EnforcementChange.objects.get(pk=last.pk).state == "applied", timeout=30
    ), worker.log()[-3000:]


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_tls_device_rotates_its_certificate_keeps_working_and_the_old_one_is_refused_after_the_grace(
    broker,  # noqa: F811
    rotation_worker,  # noqa: F811
    operator,
    tmp_path,
):
    from django.conf import settings as django_settings

    from fleetkeeper_device import Backoff, DeviceClient
    from fleetkeeper_device.credentials import CredentialSet, MemoryCredentialStore
    from fleetkeeper_device.tls import TLSOptions
    from security.models import DeviceActivity
    from security.rotation import services as rotation_services
    from tests.security.pki_helpers import key_pem
    from tests.support.broker import MqttClient, TlsFiles

    worker = rotation_worker["worker"]
    client_id = "device-rot-tls"
    device = DeviceFactory(client_id=client_id)
    old_key, csr = csr_for(client_id)
    old = pki.certificate_issue_from_csr(actor=operator, device=device, csr_pem=csr).record
    _applied(worker)
    chain = pki.ca_chain_pem()
    ca_file = tmp_path / "chain.pem"
    ca_file.write_text(chain)
    store = MemoryCredentialStore(CredentialSet(certificate_pem=old.certificate_pem, private_key_pem=key_pem(old_key)))
    client = DeviceClient(
        client_id,
        host="localhost",
        port=django_settings.MQTT_TLS_PORT,
        credentials=store,
        tls=TLSOptions(ca_file=str(ca_file)),
        backoff=Backoff(initial=0.2, maximum=1.0),
        stable_after=1.0,
    )
    client.start()
    try:
        assert client.wait_connected(15), (client.stats, broker.log()[-2000:])

        def telemetry():
            return DeviceActivity.objects.filter(client_id=client_id).values_list("telemetry", flat=True).first() or 0

        assert wait_until(lambda: client.publish_telemetry({"t": 1.0}) and telemetry() >= 1, timeout=30.0), (
            worker.log()[-3000:]
        )

        rotation = rotation_services.rotation_start(actor=operator, device=device)
        assert rotation.kind == "certificate"
        # renew -> the device's CSR (through the consumer) -> signed -> certificate -> the device's ack: confirmed.
        assert wait_until(lambda: CredentialRotation.objects.get(pk=rotation.pk).state == "confirmed", timeout=60), (
            CredentialRotation.objects.get(pk=rotation.pk).history,
            worker.log()[-4000:],
        )
        rotation.refresh_from_db()
        new = rotation.new_certificate
        assert rotation.old_certificate_id == old.pk and new.status == "active"
        assert store.load().certificate_pem == new.certificate_pem  # installed on the device
        assert store.load().private_key_pem != key_pem(old_key)  # a new key, made on the device
        # Within the grace both certificates work: the device's session (old certificate) is still up.
        assert client.connected
        connects = client.stats["connects"]

        # The grace ends (moved forward instead of waited out); the periodic job revokes the old certificate: CRL,
        # reload, and the session still open with it is taken over, so the device reconnects with the new one.
        CredentialRotation.objects.filter(pk=rotation.pk).update(deadline=timezone.now())
        assert certificates.certificate_rotations_finish() == 1
        rotation.refresh_from_db()
        old.refresh_from_db()
        assert rotation.state == "completed" and old.status == "revoked"
        assert wait_until(lambda: client.stats["connects"] > connects and client.connected, timeout=40), (
            client.stats,
            worker.log()[-3000:],
        )
        before = telemetry()
        assert wait_until(lambda: client.publish_telemetry({"t": 2.0}) and telemetry() > before, timeout=20)
        assert client.stats["refused"] == 0

        # The old certificate is refused at TLS; the new one (the device's) is accepted.
        files = TlsFiles(ca_chain=chain, cert=old.certificate_pem, key=key_pem(old_key), directory=tmp_path / "old")
        intruder = MqttClient(django_settings.MQTT_TLS_PORT, client_id=client_id, tls=files, host="localhost")
        try:
            outcome = intruder.connect_outcome()
        finally:
            intruder.close()
        assert outcome.startswith("refused"), outcome
        assert client.connected
        actions = set(AuditEvent.objects.filter(object_id=client_id).values_list("action", flat=True))
        assert {"rotation.start", "rotation.certificate_signed", "rotation.confirm", "certificate.revoke"} <= actions
    finally:
        client.stop()
