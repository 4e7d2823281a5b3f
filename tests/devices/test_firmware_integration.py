"""The firmware registry end to end: a real Mosquitto with the rendered policy, a real Celery worker (delivery through
the commander identity, the MQTT consumer handing acks to the inbox, the model check), the console serving the image
(live_server), and real devices (fleetkeeper_device.DeviceClient) configured with the registry's public key. Judged by
what the devices do: accept (after downloading the image and checking its digest) or refuse, with their reason."""

import io
import urllib.request

import pytest
from django.db import connection

from devices.firmware import services as firmware
from devices.models import Device, FirmwareOffer, FirmwareRelease, FirmwareSigningKey
from security.models import Alert
from tests.factories import DeviceModelFactory
from tests.security.test_rotation import WORKER_ENV, live
from tests.support.servers import CeleryWorker
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

IMAGE = b"FIRMWARE-2.0.0 " * 4096


@pytest.fixture(scope="module")
def firmware_worker(django_db_setup, django_db_blocker):
    with django_db_blocker.unblock():
        db_name = str(connection.settings_dict["NAME"])
    worker = CeleryWorker(db_name=db_name, extra_env=WORKER_ENV).start()
    yield worker
    worker.stop()


@pytest.fixture
def broker(transactional_db, mosquitto, firmware_worker, settings, tmp_path, live_server):
    from django.apps import apps

    from security.roles import roles_sync

    roles_sync(apps)
    settings.FIRMWARE_STORAGE_DIR = tmp_path  # where live_server (this process) serves the images from
    settings.FIRMWARE_DOWNLOAD_BASE_URL = live_server.url  # fixed on each offer when it is made
    assert mosquitto.wait_for_log("fleetkeeper-consumer 1 $share/", timeout=20), firmware_worker.log()[-3000:]
    yield mosquitto
    from fleet.celery import app

    app.control.purge()


class Installer:
    """The device application's half: download the offered image, check it against the signed digest, accept."""

    def __init__(self):
        self.installed: list[str] = []

    def __call__(self, offer) -> bool:
        with urllib.request.urlopen(offer.url, timeout=10) as response:
            offer.check_image(response.read())
        self.installed.append(offer.version)
        return True


def offer_of(release, client_id):
    return FirmwareOffer.objects.filter(release=release, client_id=client_id).first()


def answered(release, client_id):
    offer = offer_of(release, client_id)
    return offer is not None and offer.state not in ("pending", "delivered")


def test_a_signed_offer_is_accepted_and_a_foreign_or_tampered_one_is_refused(
    broker, operator, admin_user_role, devices, firmware_worker
):
    worker = firmware_worker
    model = DeviceModelFactory(name="Valve-FW")
    row, secret = live(operator, "device-fw-e2e", worker)
    Device.objects.filter(pk=row.pk).update(model=model)
    release = firmware.firmware_release_create(actor=operator, model=model, version="2.0.0", image=io.BytesIO(IMAGE))
    key = FirmwareSigningKey.objects.get(active=True)

    installer = Installer()
    device = devices(
        "device-fw-e2e",
        secret,
        firmware_version="1.9.0",
        firmware_public_key=key.public_key_pem,
        firmware_hook=installer,
    )
    assert device.wait_connected(10)
    assert wait_until(lambda: Device.objects.get(pk=row.pk).firmware_version == "1.9.0", timeout=30.0), worker.log()[
        -3000:
    ]

    # 1. Signed by the registry: the device verifies, downloads from the console, checks the digest, accepts.
    firmware.firmware_offer(actor=operator, release=release, device_ids=[row.pk])
    assert wait_until(lambda: answered(release, "device-fw-e2e"), timeout=40), worker.log()[-4000:]
    offer = offer_of(release, "device-fw-e2e")
    assert offer.state == "accepted", (offer.state, offer.detail, offer.last_error)
    assert offer.detail == "signature verified; accepted" and offer.delivered_at and offer.answered_at
    assert installer.installed == ["2.0.0"]
    print(f"offer to answer: {(offer.answered_at - offer.created).total_seconds() * 1000:.0f} ms")

    # 2. A digest changed after signing (the registry's row tampered with): the signature no longer verifies.
    tampered = firmware.firmware_release_create(
        actor=operator, model=model, version="2.0.1", image=io.BytesIO(IMAGE + b"1")
    )
    FirmwareRelease.objects.filter(pk=tampered.pk).update(sha256="0" * 64)
    firmware.firmware_offer(actor=operator, release=tampered, device_ids=[row.pk])
    assert wait_until(lambda: answered(tampered, "device-fw-e2e"), timeout=40), worker.log()[-4000:]
    refused = offer_of(tampered, "device-fw-e2e")
    assert refused.state == "rejected"
    assert "signature does not verify" in refused.detail

    # 3. Signed by another key (the registry's key was replaced; this device still trusts the old one).
    firmware.firmware_signing_key_create(actor=admin_user_role)
    foreign = firmware.firmware_release_create(
        actor=operator, model=model, version="2.1.0", image=io.BytesIO(IMAGE + b"2")
    )
    assert foreign.key.key_id != key.key_id
    firmware.firmware_offer(actor=operator, release=foreign, device_ids=[row.pk])
    assert wait_until(lambda: answered(foreign, "device-fw-e2e"), timeout=40), worker.log()[-4000:]
    refused = offer_of(foreign, "device-fw-e2e")
    assert refused.state == "rejected" and "signature does not verify" in refused.detail
    assert installer.installed == ["2.0.0"]  # nothing refused was installed


def test_withdrawing_or_marking_vulnerable_alerts_the_devices_running_it(broker, operator, devices, firmware_worker):
    worker = firmware_worker
    model = DeviceModelFactory(name="Meter-FW")
    on_it, secret_a = live(operator, "device-fw-on", worker)
    newer, secret_b = live(operator, "device-fw-newer", worker)
    Device.objects.filter(pk__in=[on_it.pk, newer.pk]).update(model=model)
    v3 = firmware.firmware_release_create(actor=operator, model=model, version="3.0", image=io.BytesIO(IMAGE + b"3"))
    v31 = firmware.firmware_release_create(actor=operator, model=model, version="3.1", image=io.BytesIO(IMAGE + b"31"))
    devices("device-fw-on", secret_a, firmware_version="3.0")
    devices("device-fw-newer", secret_b, firmware_version="3.1")
    # The status messages carry the versions; 3.0 is behind the latest 3.1: a warning (low), not an incident.
    assert wait_until(
        lambda: Alert.objects.filter(kind="firmware_outdated", client_id="device-fw-on").exists(), timeout=30
    ), worker.log()[-4000:]
    assert Alert.objects.get(kind="firmware_outdated", client_id="device-fw-on").severity == "low"
    assert wait_until(lambda: Device.objects.get(pk=newer.pk).firmware_version == "3.1", timeout=30.0), worker.log()[
        -3000:
    ]

    firmware.firmware_release_mark_vulnerable(actor=operator, release=v3, advisory="CVE-2026-4242: auth bypass")
    assert wait_until(
        lambda: Alert.objects.filter(kind="firmware_vulnerable", client_id="device-fw-on").exists(), timeout=30
    ), worker.log()[-4000:]
    alert = Alert.objects.get(kind="firmware_vulnerable", client_id="device-fw-on")
    assert alert.severity == "critical" and "CVE-2026-4242" in alert.summary

    firmware.firmware_release_withdraw(actor=operator, release=v31, reason="bricks the radio on rev B boards")
    assert wait_until(
        lambda: Alert.objects.filter(kind="firmware_withdrawn", client_id="device-fw-newer").exists(), timeout=30
    ), worker.log()[-4000:]
    assert Alert.objects.get(kind="firmware_withdrawn", client_id="device-fw-newer").severity == "medium"
    # Each verdict hit only the devices on that version.
    assert not Alert.objects.filter(client_id="device-fw-newer", kind="firmware_vulnerable").exists()
    assert not Alert.objects.filter(client_id="device-fw-on", kind="firmware_withdrawn").exists()
