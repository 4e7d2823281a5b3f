"""Firmware pages: the list (empty state, upload, public key, devices per version in constant queries), a release's page
(offer with a typed count for large sets, withdraw, mark vulnerable), the device page's card, the image download and
the API's upload and offer paths."""

import hashlib
import io

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from devices.firmware import services
from devices.models import FirmwareOffer, FirmwareRelease
from tests.factories import DeviceFactory, DeviceModelFactory

IMAGE = b"image bytes " * 500


@pytest.fixture(autouse=True)
def storage(settings, tmp_path):
    settings.FIRMWARE_STORAGE_DIR = tmp_path
    settings.FIRMWARE_OFFER_CONFIRM_ABOVE = 3
    return tmp_path


@pytest.fixture
def model(db):
    return DeviceModelFactory(name="Pump-7")


def make_release(operator, model, version="1.0", image=IMAGE):
    return services.firmware_release_create(actor=operator, model=model, version=version, image=io.BytesIO(image))


def test_empty_registry_says_what_to_do(operator_client):
    page = operator_client.get(reverse("firmware-list")).content.decode()
    assert "No firmware registered yet" in page and "add a device model" in page
    assert 'id="firmware-upload"' in page


def test_upload_signs_and_lists_the_release_with_device_counts(operator_client, operator, model):
    response = operator_client.post(
        reverse("firmware-list"),
        {"model": "Pump-7", "version": "1.10", "image": SimpleUploadedFile("fw.bin", IMAGE), "notes": "first"},
    )
    release = FirmwareRelease.objects.get(version="1.10")
    assert response.status_code == 302 and response["Location"] == reverse("firmware-detail", args=[release.pk])
    assert release.sha256 == hashlib.sha256(IMAGE).hexdigest()
    DeviceFactory(client_id="device-p1", model=model, firmware_version="1.10")
    DeviceFactory(client_id="device-p2", model=model, firmware_version="1.10.0")  # the same version
    page = operator_client.get(reverse("firmware-list")).content.decode()
    assert "BEGIN PUBLIC KEY" in page and "PRIVATE" not in page
    assert release.key.key_id in page
    assert '?model=Pump-7&amp;firmware=1.10">2</a>' in page
    DeviceFactory(client_id="device-p3", model=model, firmware_version="0.9-custom")
    page = operator_client.get(reverse("firmware-list")).content.decode()
    assert "Also running, not in the registry" in page and "0.9-custom</a> (1)" in page


def test_upload_errors_say_what_is_wrong(operator_client, model):
    response = operator_client.post(
        reverse("firmware-list"), {"model": "Pump-7", "version": "1.2 beta", "image": SimpleUploadedFile("f", IMAGE)}
    )
    assert response.status_code == 400
    assert "one to four dot-separated numbers" in response.content.decode()
    response = operator_client.post(reverse("firmware-list"), {"model": "Pump-7", "version": "1.2"})
    assert response.status_code == 400 and "Give either an image" in response.content.decode()


def test_readers_see_the_page_but_cannot_upload(client, auditor, model):
    client.force_login(auditor)
    page = client.get(reverse("firmware-list"))
    assert page.status_code == 200 and 'id="firmware-upload"' not in page.content.decode()
    response = client.post(reverse("firmware-list"), {"model": "Pump-7", "version": "1.0"})
    assert response.status_code == 403 and not FirmwareRelease.objects.exists()


def test_the_list_counts_in_constant_queries(operator_client, operator, model, django_assert_max_num_queries):
    for i in range(5):
        make_release(operator, model, f"1.{i}", IMAGE + bytes([i]))
    DeviceFactory.create_batch(10, model=model, firmware_version="1.1")
    with django_assert_max_num_queries(16) as small:
        operator_client.get(reverse("firmware-list"))
    DeviceFactory.create_batch(200, model=model, firmware_version="1.2")
    with django_assert_max_num_queries(len(small.captured_queries)):
        operator_client.get(reverse("firmware-list"))


def test_a_large_offer_needs_the_typed_count(operator_client, operator, model):
    release = make_release(operator, model, "2.0")
    for i in range(5):
        DeviceFactory(client_id=f"device-o{i}", model=model, firmware_version="1.0")
    DeviceFactory(client_id="device-done", model=model, firmware_version="2.0")  # already on it: not counted
    page = operator_client.get(reverse("firmware-detail", args=[release.pk]))
    assert 'data-eligible="5"' in page.content.decode() and "Type <strong" in page.content.decode()
    url = reverse("firmware-offer", args=[release.pk])
    response = operator_client.post(url, {"confirm_count": "4"})
    assert response.status_code == 400 and "now match 5 device(s), not 4" in response.content.decode()
    assert not FirmwareOffer.objects.exists()
    response = operator_client.post(url, {"confirm_count": "5"})
    assert response.status_code == 302
    assert FirmwareOffer.objects.filter(release=release).count() == 5
    # A narrower filter under the threshold needs no count; a device whose offer is still open is not offered twice.
    response = operator_client.post(url, {"search": "device-o1"}, follow=True)
    assert "0 device(s)" in response.content.decode() and "1 already offered" in response.content.decode()
    assert FirmwareOffer.objects.count() == 5
    # Devices with an offer of this release still open are skipped.
    result = services.firmware_offer(
        actor=operator, release=release, device_ids=[o.device_id for o in FirmwareOffer.objects.all()]
    )
    assert result == {"offered": [], "skipped": {"already offered": 5}}


def test_withdraw_and_mark_vulnerable_from_the_page(operator_client, operator, model):
    release = make_release(operator, model, "3.0")
    response = operator_client.post(reverse("firmware-vulnerable", args=[release.pk]), {"text": "CVE-2026-7"})
    assert response.status_code == 302
    page = operator_client.get(reverse("firmware-detail", args=[release.pk])).content.decode()
    assert "known-vulnerable" in page and "CVE-2026-7" in page and 'id="offer-form"' not in page
    response = operator_client.post(reverse("firmware-withdraw", args=[release.pk]), {"text": ""})
    assert response.status_code == 400
    operator_client.post(reverse("firmware-withdraw", args=[release.pk]), {"text": "recalled"})
    assert FirmwareRelease.objects.get(pk=release.pk).withdrawn


def test_support_cannot_withdraw(client, support, operator, model):
    release = make_release(operator, model, "3.1")
    client.force_login(support)
    assert client.post(reverse("firmware-withdraw", args=[release.pk]), {"text": "x"}).status_code == 403


def test_device_card_shows_running_vs_latest_and_offers(operator_client, operator, model):
    release = make_release(operator, model, "4.0")
    device = DeviceFactory(client_id="device-card", model=model, firmware_version="3.9")
    services.firmware_offer(actor=operator, release=release, devices=[device])
    card = operator_client.get(reverse("device-firmware", args=["device-card"])).content.decode()
    assert "3.9" in card and "outdated" in card and "4.0" in card and "Waiting to be sent" in card
    page = operator_client.get(reverse("device-detail", args=["device-card"])).content.decode()
    assert reverse("device-firmware", args=["device-card"]) in page


def test_the_image_is_served_by_digest_without_login(client, operator, model):
    release = make_release(operator, model, "5.0")
    response = client.get(reverse("firmware-image", args=[release.sha256]))
    assert response.status_code == 200 and b"".join(response.streaming_content) == IMAGE
    assert client.get(reverse("firmware-image", args=["0" * 64])).status_code == 404
    services.firmware_release_withdraw(actor=operator, release=release, reason="pulled")
    assert client.get(reverse("firmware-image", args=[release.sha256])).status_code == 404


def test_api_multipart_upload_filters_and_offer_by_filters(operator, model):
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=operator).key}")
    response = api.post(
        "/api/v1/firmware/",
        {"model": "Pump-7", "version": "6.0", "image": SimpleUploadedFile("fw.bin", IMAGE), "minimum_secure": True},
        format="multipart",
    )
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["sha256"] == hashlib.sha256(IMAGE).hexdigest() and body["minimum_secure"] is True
    assert body["image_url"].endswith(f"/firmware/images/{body['sha256']}.bin")
    response = api.post("/api/v1/firmware/", {"model": "Pump-7", "version": "bad version"}, format="json")
    assert response.status_code == 400 and "one to four" in str(response.json())
    assert api.get("/api/v1/firmware/?flag=minimum_secure").json()["count"] == 1
    assert api.get("/api/v1/firmware/?flag=withdrawn").json()["count"] == 0
    assert api.get("/api/v1/firmware/?model=Pump-7&version=6.0").json()["count"] == 1
    DeviceFactory(client_id="device-api1", model=model, firmware_version="5.0")
    DeviceFactory(client_id="device-api2", model=model, firmware_version="5.0")
    url = f"/api/v1/firmware/{body['id']}/offer/"
    response = api.post(url, {"filters": {"firmware": "5.0"}, "confirm_count": 3}, format="json")
    assert response.status_code == 400 and "now match 2" in str(response.json())
    response = api.post(url, {"filters": {"firmware": "5.0"}, "confirm_count": 2}, format="json")
    assert response.status_code == 202 and response.json()["offered"] == 2
    response = api.post(url, {"client_ids": ["device-api1", "device-nobody"]}, format="json")
    assert response.json()["skipped"] == {"already offered": 1, "unknown device": 1}
    detail = api.get(f"/api/v1/firmware/{body['id']}/").json()
    assert detail["offers"] == {"pending": 2}
    key = api.get("/api/v1/firmware/signing-key/").json()
    assert key["public_key_pem"].startswith("-----BEGIN PUBLIC KEY") and "private" not in str(key).lower()


def test_only_admins_replace_the_signing_key(client, operator, admin_user_role, model):
    old = make_release(operator, model, "7.0").key
    client.force_login(operator)
    assert 'id="firmware-key-rotate"' not in client.get(reverse("firmware-list")).content.decode()
    assert client.post(reverse("firmware-key-create"), {"confirm": "rotate"}).status_code == 403
    client.force_login(admin_user_role)
    client.post(reverse("firmware-key-create"), {})  # unconfirmed: nothing happens
    old.refresh_from_db()
    assert old.active
    response = client.post(reverse("firmware-key-create"), {"confirm": "rotate"}, follow=True)
    old.refresh_from_db()
    assert not old.active and "is active; the previous key is retired" in response.content.decode()


def test_offer_the_latest_release_to_one_device_from_its_page(operator_client, operator, model):
    release = make_release(operator, model, "8.0")
    DeviceFactory(client_id="device-one", model=model, firmware_version="7.0")
    DeviceFactory(client_id="device-one0", model=model, firmware_version="7.0")  # a prefix match must not get it
    card = operator_client.get(reverse("device-firmware", args=["device-one"])).content.decode()
    assert 'id="device-firmware-offer"' in card
    response = operator_client.post(reverse("firmware-offer", args=[release.pk]), {"client_id": "device-one"})
    assert response.status_code == 302 and response["Location"] == reverse("device-detail", args=["device-one"])
    assert list(FirmwareOffer.objects.values_list("client_id", flat=True)) == ["device-one"]
    response = operator_client.post(
        reverse("firmware-offer", args=[release.pk]), {"client_id": "device-one"}, follow=True
    )
    assert "was not offered Pump-7 8.0: already offered" in response.content.decode()
