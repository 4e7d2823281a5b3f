"""Firmware registry: version ordering, signing (verified by the device library), the services and the detection
verdicts. The end-to-end path with a real broker, worker and device is tests/devices/test_firmware_integration.py."""

import base64
import hashlib
import io
import json
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from django.core.exceptions import PermissionDenied, ValidationError
from django.utils import timezone

from devices.firmware import detection, services, signing, versions
from devices.models import DeviceModel, FirmwareOffer, FirmwareRelease, FirmwareSigningKey
from fleetkeeper_device.firmware import FirmwareOffer as DeviceOffer
from fleetkeeper_device.firmware import FirmwareRejected, load_public_key, verify_offer
from security.audit import audit_context
from security.models import Alert, AuditEvent
from tests.factories import DeviceFactory, DeviceModelFactory

IMAGE = b"\x7fELF firmware image " * 1000


# --- versions -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lower,higher",
    [
        ("1.9", "1.10"),
        ("1.9.9", "1.10.0"),
        ("2", "10"),
        ("1.2.3", "1.2.4"),
        ("v1.2", "1.3"),
        ("3.0.0-rc.1", "3.0.0"),
        ("3.0.0-alpha", "3.0.0-beta"),
        ("3.0.0-rc.2", "3.0.0-rc.10"),
        ("3.0.0-rc.10", "3.0.0-rca"),  # numeric identifiers sort before alphanumeric (semver)
        ("1.2.3", "1.2.3.1"),
    ],
)
def test_versions_order_numerically_and_the_sort_key_agrees(lower, higher):
    assert versions.compare(lower, higher) == -1
    assert versions.compare(higher, lower) == 1
    assert versions.sort_key(lower) < versions.sort_key(higher)


def test_missing_parts_are_zeros():
    assert versions.compare("1.2", "1.2.0") == 0
    assert versions.sort_key("1.2") == versions.sort_key("v1.2.0.0")


@pytest.mark.parametrize("bad", ["", "abc", "1.2.3+build5", "1.2.3.4.5", "1..2", "1.2 beta", "2024/01/01", "1.x"])
def test_versions_outside_the_format_are_refused_with_the_format(bad):
    assert versions.parse(bad) is None
    with pytest.raises(versions.InvalidVersion) as error:
        versions.validate(bad)
    assert "one to four dot-separated numbers" in str(error.value)
    assert versions.compare(bad, "1.0") is None


# --- signing ------------------------------------------------------------------------------------------------------


@pytest.fixture
def admin(user_with_role):
    return user_with_role("admin")


@pytest.fixture
def model(db):
    return DeviceModelFactory(name="Thermo-9")


def release(operator, model, version, image=IMAGE, **kw):
    return services.firmware_release_create(actor=operator, model=model, version=version, image=io.BytesIO(image), **kw)


def device_offer(rel, **overrides):
    fields = dict(
        message_id="x",
        version=rel.version,
        url="http://x/",
        size=rel.size,
        sha256=rel.sha256,
        signature=rel.signature,
        key_id=rel.key.key_id,
    )
    fields.update(overrides)
    return DeviceOffer(**fields)


def test_a_release_is_signed_so_the_device_library_verifies_it(operator, model, settings, tmp_path):
    settings.FIRMWARE_STORAGE_DIR = tmp_path
    rel = release(operator, model, "1.10.0", notes="fixes")
    assert rel.sha256 == hashlib.sha256(IMAGE).hexdigest() and rel.size == len(IMAGE)
    assert (tmp_path / f"{rel.sha256}.bin").read_bytes() == IMAGE
    key = FirmwareSigningKey.objects.get(active=True)
    assert rel.key == key and key.key_id.startswith("fw-")
    # The private key is stored encrypted, never in clear.
    assert "ENCRYPTED PRIVATE KEY" in key.private_key_encrypted
    public = load_public_key(key.public_key_pem)
    assert signing.key_id_for(public) == key.key_id
    verify_offer(device_offer(rel), public)  # does not raise
    device_offer(rel).check_image(IMAGE)
    # A tampered digest or another key's signature is refused by the device library.
    with pytest.raises(FirmwareRejected):
        verify_offer(device_offer(rel, sha256=hashlib.sha256(b"evil").hexdigest()), public)
    other = Ed25519PrivateKey.generate()
    forged = base64.b64encode(other.sign(bytes.fromhex(rel.sha256))).decode()
    with pytest.raises(FirmwareRejected):
        verify_offer(device_offer(rel, signature=forged), public)
    assert AuditEvent.objects.filter(action="firmware.release", object_id=str(rel.pk)).exists()
    assert AuditEvent.objects.filter(action="firmware_key.create").exists()


def test_a_new_key_retires_the_old_one_and_only_admins_create_keys(operator, admin, model, settings, tmp_path):
    settings.FIRMWARE_STORAGE_DIR = tmp_path
    first = release(operator, model, "1.0").key
    with pytest.raises(PermissionDenied):
        services.firmware_signing_key_create(actor=operator)
    second = services.firmware_signing_key_create(actor=admin)
    first.refresh_from_db()
    assert not first.active and first.retired_at and second.active
    assert release(operator, model, "1.1").key == second


def test_release_rules(operator, auditor, model, settings, tmp_path):
    settings.FIRMWARE_STORAGE_DIR = tmp_path
    release(operator, model, "1.2")
    with pytest.raises(ValidationError, match="already has release"):
        release(operator, model, "1.2.0")
    with pytest.raises(ValidationError, match="one to four"):
        release(operator, model, "latest")
    with pytest.raises(PermissionDenied):
        release(auditor, model, "1.3")
    with pytest.raises(ValidationError, match="SHA-256"):
        services.firmware_release_create(actor=operator, model=model, version="1.4", url="https://cdn/x.bin", size=3)
    hosted = services.firmware_release_create(
        actor=operator, model=model, version="1.4", url="https://cdn.example/x.bin", sha256="ab" * 32, size=3
    )
    assert hosted.stored_name == "" and services.image_url(hosted) == "https://cdn.example/x.bin"
    settings.FIRMWARE_MAX_IMAGE_BYTES = 10
    with pytest.raises(ValidationError, match="FIRMWARE_MAX_IMAGE_BYTES"):
        release(operator, model, "1.5")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".upload")] == []


# --- derived model fields and detection -----------------------------------------------------------------------------


def test_the_registry_derives_latest_minimum_and_flags(operator, model, settings, tmp_path):
    settings.FIRMWARE_STORAGE_DIR = tmp_path
    model.latest_firmware, model.minimum_firmware = "0.1", "0.1"
    model.save()
    release(operator, model, "1.9", minimum_secure=True)
    r110 = release(operator, model, "1.10")
    model.refresh_from_db()
    assert (model.latest_firmware, model.minimum_firmware) == ("1.10", "1.9")
    services.firmware_release_withdraw(actor=operator, release=r110, reason="bricks the radio")
    model.refresh_from_db()
    assert model.latest_firmware == "1.9"
    assert model.firmware_flags[versions.sort_key("1.10")]["withdrawn"] is True


@pytest.mark.parametrize(
    "running,kind",
    [
        ("1.10", ""),
        ("1.10.0", ""),
        ("1.9.5", "firmware_outdated"),
        ("1.9.1", "firmware_vulnerable"),
        ("1.8", "firmware_below_minimum"),
        ("2.0", "firmware_withdrawn"),
        ("weird-build", ""),
    ],
)
def test_detection_verdicts_from_the_registry(operator, model, settings, tmp_path, running, kind):
    settings.FIRMWARE_STORAGE_DIR = tmp_path
    release(operator, model, "1.9", minimum_secure=True)
    services.firmware_release_mark_vulnerable(
        actor=operator, release=release(operator, model, "1.9.1", image=IMAGE + b"1"), advisory="CVE-2026-1"
    )
    release(operator, model, "1.9.5", image=IMAGE + b"5")
    release(operator, model, "1.10", image=IMAGE + b"10")
    services.firmware_release_withdraw(
        actor=operator, release=release(operator, model, "2.0", image=IMAGE + b"2"), reason="recalled"
    )
    model = DeviceModel.objects.get(pk=model.pk)
    assert detection.verdict(model, running)[0] == kind


def test_marking_vulnerable_alerts_the_devices_running_it(operator, model, settings, tmp_path):
    settings.FIRMWARE_STORAGE_DIR = tmp_path
    rel = release(operator, model, "2.1")
    on_it = DeviceFactory(client_id="device-fw-on", model=model, firmware_version="2.1")
    DeviceFactory(client_id="device-fw-newer", model=model, firmware_version="2.2")
    services.firmware_release_mark_vulnerable(actor=operator, release=rel, advisory="CVE-2026-0002: remote code")
    with audit_context(service="test"):
        counts = detection.firmware_model_check(model_id=model.pk)
    assert counts == {"firmware_vulnerable": 1}
    alert = Alert.objects.get(kind="firmware_vulnerable")
    assert alert.client_id == on_it.client_id and alert.severity == "critical"
    assert "CVE-2026-0002" in alert.summary
    with pytest.raises(ValidationError, match="known-vulnerable"):
        services.firmware_offer(actor=operator, release=rel, devices=[on_it])


# --- offers and answers ---------------------------------------------------------------------------------------------


def test_offers_skip_other_models_and_revoked_devices_and_record_answers(operator, model, settings, tmp_path):
    settings.FIRMWARE_STORAGE_DIR = tmp_path
    rel = release(operator, model, "3.0")
    ok = DeviceFactory(client_id="device-fw-a", model=model)
    held = DeviceFactory(client_id="device-fw-q", model=model, status="quarantined")
    gone = DeviceFactory(client_id="device-fw-r", model=model, status="revoked")
    other = DeviceFactory(client_id="device-fw-o")
    result = services.firmware_offer(actor=operator, release=rel, devices=[ok, held, gone, other])
    assert result["skipped"] == {"revoked": 1, "another model": 1}
    offers = {o.client_id: o for o in FirmwareOffer.objects.filter(pk__in=result["offered"])}
    assert set(offers) == {"device-fw-a", "device-fw-q"}
    assert AuditEvent.objects.filter(action="firmware.offer").count() == 2
    counts = services.firmware_offers_answered(
        acks=[
            ("device-fw-a", offers["device-fw-a"].command_id, "ok", "signature verified; accepted"),
            ("device-fw-o", offers["device-fw-q"].command_id, "ok", ""),  # another device's id: ignored
            ("device-fw-q", "fw-unknown", "rejected", "x"),
        ]
    )
    assert counts == {"answered": 1, "ignored": 2}
    offers["device-fw-a"].refresh_from_db()
    assert offers["device-fw-a"].state == "accepted" and offers["device-fw-a"].detail.startswith("signature")
    assert FirmwareOffer.objects.get(client_id="device-fw-q").state == "pending"


def test_withdrawing_cancels_pending_offers(operator, model, settings, tmp_path):
    settings.FIRMWARE_STORAGE_DIR = tmp_path
    rel = release(operator, model, "4.0")
    services.firmware_offer(actor=operator, release=rel, devices=[DeviceFactory(client_id="device-fw-w", model=model)])
    services.firmware_release_withdraw(actor=operator, release=rel, reason="wrong build")
    assert FirmwareOffer.objects.get(client_id="device-fw-w").state == "cancelled"
    assert FirmwareRelease.objects.get(pk=rel.pk).withdrawn
    with pytest.raises(ValidationError, match="withdrawn"):
        services.firmware_offer(actor=operator, release=rel, device_ids=[])


def test_the_download_address_is_fixed_when_offering(operator, model, settings, tmp_path):
    settings.FIRMWARE_STORAGE_DIR = tmp_path
    settings.FIRMWARE_DOWNLOAD_BASE_URL = "https://console.example"
    rel = release(operator, model, "5.0")
    services.firmware_offer(actor=operator, release=rel, devices=[DeviceFactory(client_id="device-fw-x", model=model)])
    offer = FirmwareOffer.objects.get(client_id="device-fw-x")
    assert offer.url == f"https://console.example/firmware/images/{rel.sha256}.bin"
    settings.FIRMWARE_DOWNLOAD_BASE_URL = "http://elsewhere"  # a worker configured differently sends the same URL
    assert json.loads(services.offer_message(offer, now=1.0))["url"] == offer.url
    settings.FIRMWARE_DOWNLOAD_BASE_URL = ""
    with pytest.raises(ValidationError, match="FIRMWARE_DOWNLOAD_BASE_URL is not set"):
        services.firmware_offer(
            actor=operator, release=rel, devices=[DeviceFactory(client_id="device-fw-y", model=model)]
        )


def test_an_offer_whose_delivery_failed_is_replaced_when_offered_again(operator, model, settings, tmp_path):
    settings.FIRMWARE_STORAGE_DIR = tmp_path
    rel = release(operator, model, "6.0")
    device = DeviceFactory(client_id="device-fw-z", model=model)
    first = services.firmware_offer(actor=operator, release=rel, devices=[device])["offered"][0]
    assert services.firmware_offer(actor=operator, release=rel, devices=[device])["skipped"] == {"already offered": 1}
    FirmwareOffer.objects.filter(pk=first).update(attempts=7, last_error="cannot reach the broker")
    second = services.firmware_offer(actor=operator, release=rel, devices=[device])["offered"]
    assert len(second) == 1 and FirmwareOffer.objects.get(pk=first).state == "cancelled"
    # Delivered and unanswered past its expiry: replaced too.
    FirmwareOffer.objects.filter(pk=second[0]).update(
        state="delivered", delivered_at=timezone.now() - timedelta(seconds=settings.FIRMWARE_OFFER_TTL_SECONDS + 5)
    )
    third = services.firmware_offer(actor=operator, release=rel, devices=[device])["offered"]
    assert len(third) == 1 and FirmwareOffer.objects.get(pk=second[0]).state == "cancelled"
