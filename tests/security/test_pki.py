"""The PKI without a broker: CSR checks and the certificates the console issues, keys encrypted at rest, the CRL,
the pages and downloads, the import command. The broker's side is in test_pki_broker.py."""

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from django.core.management import call_command
from django.core.management.base import CommandError
from rest_framework.test import APIClient

from devices.models import Device
from security.brokers import broker_config
from security.models import AuditEvent, CertificateAuthority, DeviceCertificate
from security.pki import ca as pki_ca
from security.pki import services as pki
from security.services import policy_desired
from tests.factories import DeviceFactory
from tests.security.pki_helpers import (
    cn,
    csr_for,
    csr_with_subject,
    ec_key,
    ed_key,
    key_pem,
    rsa_key,
    tampered_csr,
)

pytestmark = pytest.mark.django_db


def api(user):
    client = APIClient()
    client.force_authenticate(user)
    return client


def post_csr(user, client_id, csr, **extra):
    return api(user).post(f"/api/v1/devices/{client_id}/certificates/", {"csr": csr, **extra}, format="json")


@pytest.mark.parametrize("make_key", [ec_key, ed_key, lambda: rsa_key(2048)], ids=["ec-p256", "ed25519", "rsa-2048"])
def test_a_good_csr_gets_a_client_auth_certificate_for_the_client_id(operator, make_key, settings):
    DeviceFactory(client_id="device-pki-1")
    key, csr = csr_for("device-pki-1", make_key())
    response = post_csr(operator, "device-pki-1", csr)
    assert response.status_code == 201, response.content
    body = response.json()
    cert = x509.load_pem_x509_certificate(body["certificate"].encode())
    chain = x509.load_pem_x509_certificates(body["chain"].encode())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "device-pki-1"
    assert cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign and not usage.crl_sign
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=settings.PKI_DEVICE_CERT_DAYS) <= lifetime <= dt.timedelta(days=90, minutes=6)
    # Chain: issuing CA signed the leaf, root signed the issuing CA.
    cert.verify_directly_issued_by(chain[0])
    chain[0].verify_directly_issued_by(chain[1])
    record = DeviceCertificate.objects.get(client_id="device-pki-1")
    assert record.serial == body["serial"] == format(cert.serial_number, "X")
    assert record.fingerprint == pki_ca.fingerprint(cert)
    assert AuditEvent.objects.filter(action="certificate.issue", object_id="device-pki-1", actor=operator).exists()


def test_serials_are_random_and_lifetime_is_configurable(operator, settings):
    settings.PKI_DEVICE_CERT_DAYS = 30
    DeviceFactory(client_id="device-pki-2")
    serials = set()
    for _ in range(2):
        body = post_csr(operator, "device-pki-2", csr_for("device-pki-2")[1]).json()
        cert = x509.load_pem_x509_certificate(body["certificate"].encode())
        serials.add(cert.serial_number)
        assert cert.serial_number.bit_length() >= 64
        assert cert.not_valid_after_utc - cert.not_valid_before_utc <= dt.timedelta(days=30, minutes=6)
    assert len(serials) == 2


@pytest.mark.parametrize(
    ("make_csr", "message"),
    [
        (lambda: csr_for("device-other")[1], "it must be this device's client id"),
        (lambda: csr_with_subject(ec_key(), cn("device-pki-3").__class__([])), "exactly one common name"),
        (lambda: csr_for("device-pki-3", rsa_key(1024))[1], "use at least 2048"),
        (lambda: tampered_csr("device-pki-3"), "signature does not verify"),
        (lambda: "not a csr", "not a PEM certificate signing request"),
        (
            lambda: csr_for(
                "device-pki-3",
                __import__("cryptography.hazmat.primitives.asymmetric.ec", fromlist=["ec"]).generate_private_key(
                    __import__("cryptography.hazmat.primitives.asymmetric.ec", fromlist=["ec"]).SECP384R1()
                ),
            )[1],
            "must be on P-256",
        ),
    ],
    ids=["subject-mismatch", "no-cn", "rsa-1024", "bad-signature", "garbage", "ec-p384"],
)
def test_a_bad_csr_is_refused_with_a_clear_400_and_nothing_is_issued(operator, make_csr, message):
    DeviceFactory(client_id="device-pki-3")
    response = post_csr(operator, "device-pki-3", make_csr())
    assert response.status_code == 400, response.content
    assert message in response.content.decode()
    assert not DeviceCertificate.objects.exists()


def test_a_revoked_device_gets_no_certificate(operator):
    DeviceFactory(client_id="device-pki-4", status=Device.Status.REVOKED)
    response = post_csr(operator, "device-pki-4", csr_for("device-pki-4")[1])
    assert response.status_code == 400
    assert "reinstate it" in response.content.decode()


def test_ca_and_broker_keys_are_encrypted_at_rest(settings):
    issuing = pki.pki_ensure()
    root = pki.root_ca()
    for row in (issuing, root):
        assert row.encrypted_key_pem.startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----")
        assert "BEGIN PRIVATE KEY" not in row.encrypted_key_pem
        with pytest.raises(TypeError):  # no password: cannot be read
            serialization.load_pem_private_key(row.encrypted_key_pem.encode(), password=None)
        with pytest.raises(ValueError):
            serialization.load_pem_private_key(row.encrypted_key_pem.encode(), password=b"wrong")
        key = serialization.load_pem_private_key(
            row.encrypted_key_pem.encode(), password=settings.FLEET_PKI_KEY.encode()
        )
        assert pki_ca.keys_match(key, pki_ca.load_cert(row.certificate_pem))
    server = pki.broker_server_cert_ensure()
    assert server.encrypted_key_pem.startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert set(pki.broker_hosts()) >= {"localhost", "127.0.0.1", settings.MQTT_HOST}
    # Created once: a second call uses the same CA.
    assert pki.pki_ensure().pk == issuing.pk
    assert CertificateAuthority.objects.filter(active=True).count() == 2


def test_factory_bundle_returns_the_key_once_and_stores_none(operator):
    DeviceFactory(client_id="device-pki-5")
    response = api(operator).post("/api/v1/devices/device-pki-5/certificates/bundle/", {}, format="json")
    assert response.status_code == 201, response.content
    assert response["Cache-Control"] == "no-store"
    body = response.json()
    key = serialization.load_pem_private_key(body["private_key"].encode(), password=None)
    assert pki_ca.keys_match(key, pki_ca.load_cert(body["certificate"]))
    record = DeviceCertificate.objects.get(client_id="device-pki-5")
    assert record.source == "factory"
    key_body = body["private_key"].splitlines()[1]
    for event in AuditEvent.objects.all():
        assert key_body not in str(event.after) and key_body not in str(event.before)
    assert key_body not in str(list(DeviceCertificate.objects.values()))


def test_revocation_puts_the_serial_on_a_crl_signed_by_the_issuing_ca(operator, support, settings):
    DeviceFactory(client_id="device-pki-6")
    post_csr(operator, "device-pki-6", csr_for("device-pki-6")[1])
    record = DeviceCertificate.objects.get(client_id="device-pki-6")
    before = pki.crl_current()
    assert before == pki.crl_current()  # stable while nothing changes (the policy digest must not churn)
    digest_before = policy_desired().digest
    assert policy_desired().digest == digest_before
    revoked = pki.certificate_revoke(actor=support, certificate=record, reason="lost")
    assert revoked.status == "revoked" and revoked.display_status == "revoked"
    pem = pki.crl_current()
    crl = x509.load_pem_x509_crl(pem.encode())
    issuing = pki.pki_ensure()
    assert crl.is_signature_valid(pki_ca.load_cert(issuing.certificate_pem).public_key())
    assert crl.get_revoked_certificate_by_serial_number(int(record.serial, 16)) is not None
    assert crl.next_update_utc > dt.datetime.now(dt.UTC) + dt.timedelta(days=settings.PKI_CRL_DAYS - 1)
    # The new CRL changes the rendered policy, so it goes out through the outbox, reload and probe.
    policy = policy_desired()
    assert policy.digest != digest_before
    assert "user device-pki-6" in policy.acl and "topic deny tx/device-pki-6/#" in policy.acl
    assert AuditEvent.objects.filter(action="certificate.revoke", object_id="device-pki-6", actor=support).exists()
    from security.models import EnforcementChange

    assert EnforcementChange.objects.filter(kind="certificate.revoke", client_id="device-pki-6").exists()


def test_device_certificates_revoke_is_the_hook_for_revoke_and_decommission(operator, support):
    device = DeviceFactory(client_id="device-pki-7")
    for _ in range(2):
        post_csr(operator, "device-pki-7", csr_for("device-pki-7")[1])
    assert pki.device_certificates_revoke(actor=support, device=device, reason="stolen") == 2
    assert set(DeviceCertificate.objects.values_list("status", flat=True)) == {"revoked"}
    assert pki.device_certificates_revoke(actor=support, device=device, reason="again") == 0


def test_roles_who_may_issue_and_revoke(support, auditor, operator):
    DeviceFactory(client_id="device-pki-8")
    assert post_csr(support, "device-pki-8", csr_for("device-pki-8")[1]).status_code == 403
    assert post_csr(auditor, "device-pki-8", csr_for("device-pki-8")[1]).status_code == 403
    assert post_csr(operator, "device-pki-8", csr_for("device-pki-8")[1]).status_code == 201
    serial = DeviceCertificate.objects.get().serial
    url = f"/api/v1/devices/device-pki-8/certificates/{serial}/revoke/"
    assert api(auditor).post(url, {"reason": "x"}, format="json").status_code == 403
    assert api(support).post(url, {"reason": "x"}, format="json").status_code == 200
    assert api(support).post(url, {"reason": "x"}, format="json").status_code == 400  # already revoked
    listing = api(auditor).get("/api/v1/devices/device-pki-8/certificates/")
    assert listing.status_code == 200 and listing.json()[0]["status"] == "revoked"


def test_expired_certificates_drop_off_the_crl_and_show_as_expired(operator):
    DeviceFactory(client_id="device-pki-9")
    post_csr(operator, "device-pki-9", csr_for("device-pki-9")[1])
    record = DeviceCertificate.objects.get()
    DeviceCertificate.objects.filter(pk=record.pk).update(
        not_after=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1), status="revoked"
    )
    record.refresh_from_db()
    assert record.display_status == "revoked"
    DeviceCertificate.objects.filter(pk=record.pk).update(status="active")
    record.refresh_from_db()
    assert record.display_status == "expired"


def test_the_pki_page_and_downloads_for_firmware_teams(client, auditor):
    client.force_login(auditor)
    page = client.get("/pki/")
    assert page.status_code == 200
    issuing = pki.pki_ensure()
    assert issuing.fingerprint in page.content.decode()
    chain = client.get("/pki/chain.pem")
    assert chain.status_code == 200
    assert "attachment" in chain["Content-Disposition"]
    certs = x509.load_pem_x509_certificates(chain.content)
    assert [c.subject.rfc4514_string() for c in certs] == [issuing.subject, pki.root_ca().subject]
    crl = x509.load_pem_x509_crl(client.get("/pki/crl.pem").content)
    assert crl.issuer.rfc4514_string() == issuing.subject and len(crl) == 0
    assert client.get("/pki/secret-key.pem").status_code == 404
    api_view = api(auditor).get("/api/v1/pki/ca/")
    assert api_view.status_code == 200 and api_view.json()["issuing"]["fingerprint"] == issuing.fingerprint


def test_pages_need_view_device(client, user_with_role):
    client.force_login(user_with_role(None, "nobody"))
    assert client.get("/pki/").status_code == 403
    assert client.get("/pki/chain.pem").status_code == 403


def test_device_page_upload_issues_and_the_card_lists_certificates(client, operator, support):
    from django.core.files.uploadedfile import SimpleUploadedFile

    DeviceFactory(client_id="device-pki-10")
    client.force_login(operator)
    _key, csr = csr_for("device-pki-10")
    response = client.post(
        "/devices/device-pki-10/certificates/issue/",
        {"csr_file": SimpleUploadedFile("device.csr", csr.encode())},
    )
    assert response.status_code == 200
    assert response["Cache-Control"] == "no-store"
    record = DeviceCertificate.objects.get()
    assert record.serial in response.content.decode()
    card = client.get("/devices/device-pki-10/certificates/").content.decode()
    assert record.serial in card and "active" in card and "Issue certificate" in card
    # A bad upload: back to the device with the reason.
    bad = client.post(
        "/devices/device-pki-10/certificates/issue/",
        {"csr_file": SimpleUploadedFile("device.csr", csr_for("device-other")[1].encode())},
        follow=True,
    )
    assert "it must be this device&#x27;s client id" in bad.content.decode()
    # Factory bundle from the page: the key is on the page once.
    bundle = client.post("/devices/device-pki-10/certificates/bundle/")
    assert "BEGIN PRIVATE KEY" in bundle.content.decode()
    # Support revokes from the card.
    client.force_login(support)
    client.post(f"/devices/device-pki-10/certificates/{record.serial}/revoke/", {"reason": "lost"})
    record.refresh_from_db()
    assert record.status == "revoked"
    card = client.get("/devices/device-pki-10/certificates/").content.decode()
    assert "revoked" in card and "Issue certificate" not in card


def test_plain_listener_off_renders_no_device_password_and_binds_loopback(operator, settings):
    from security.services import credential_issue

    device = DeviceFactory(client_id="device-pki-11")
    credential_issue(actor=operator, device=device)
    assert "device-pki-11:" in policy_desired().passwd
    settings.MQTT_PLAIN_LISTENER = False
    policy = policy_desired()
    assert "device-pki-11:" not in policy.passwd
    assert f"listener {settings.MQTT_PORT} 127.0.0.1" in policy.config
    assert f"listener {settings.MQTT_TLS_PORT} " in policy.config


def test_tls_listener_off_renders_no_tls_listener(settings):
    settings.MQTT_TLS_LISTENER = False
    assert broker_config().tls is None
    assert "require_certificate" not in policy_desired().config


def test_import_an_operators_issuing_ca(tmp_path, settings):
    from security.pki.ca import issuing_ca_create, root_ca_create

    root_key, root_cert = root_ca_create(common_name="Operator root")
    issuing_key, issuing_cert = issuing_ca_create(
        root_key=root_key, root_cert=root_cert, common_name="Operator issuing"
    )
    (tmp_path / "ca.pem").write_text(pki_ca.cert_pem(issuing_cert))
    (tmp_path / "ca.key").write_text(key_pem(issuing_key))
    (tmp_path / "chain.pem").write_text(pki_ca.cert_pem(root_cert))
    (tmp_path / "other.key").write_text(key_pem(ec_key()))
    with pytest.raises(CommandError, match="does not belong"):
        call_command("pki_import_ca", cert=str(tmp_path / "ca.pem"), key=str(tmp_path / "other.key"))
    call_command(
        "pki_import_ca", cert=str(tmp_path / "ca.pem"), key=str(tmp_path / "ca.key"), chain=str(tmp_path / "chain.pem")
    )
    issuing = pki.pki_ensure()
    assert issuing.imported and issuing.subject == "CN=Operator issuing"
    assert issuing.encrypted_key_pem.startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert pki.root_ca().subject == "CN=Operator root"
    server = pki.broker_server_cert_ensure()
    pki_ca.load_cert(server.certificate_pem).verify_directly_issued_by(issuing_cert)
    assert AuditEvent.objects.filter(action="pki.ca_import").exists()


def test_import_command_has_help():
    from io import StringIO

    out = StringIO()
    with pytest.raises(SystemExit):
        call_command("pki_import_ca", "--help", stdout=out)
