"""End to end with the real worker: revoking a certificate in the API makes the worker regenerate the CRL, reload
the broker, and cut off the session that was open with the certificate; the certificate cannot reconnect."""

import time

import pytest
from django.conf import settings
from rest_framework.test import APIClient

from security.models import AuditEvent, DeviceCertificate, EnforcementChange
from security.pki import services as pki
from tests.factories import DeviceFactory
from tests.security.pki_helpers import csr_for, key_pem
from tests.support.broker import MqttClient, TlsFiles
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def roles_present(transactional_db):
    from django.apps import apps

    from security.roles import roles_sync

    roles_sync(apps)


def api(user):
    client = APIClient()
    client.force_authenticate(user)
    return client


def test_api_revocation_cuts_off_the_live_tls_session_through_the_worker(
    roles_present, celery_worker, mosquitto, operator, support, tmp_path
):
    DeviceFactory(client_id="device-live-cert")
    key, csr = csr_for("device-live-cert")
    issued = api(operator).post("/api/v1/devices/device-live-cert/certificates/", {"csr": csr}, format="json")
    assert issued.status_code == 201
    change = EnforcementChange.objects.filter(client_id="device-live-cert").latest("id")
    assert wait_until(lambda: EnforcementChange.objects.get(pk=change.pk).state == "applied", timeout=20.0), (
        celery_worker.log()[-3000:]
    )
    files = TlsFiles(
        ca_chain=pki.ca_chain_pem(), cert=issued.json()["certificate"], key=key_pem(key), directory=tmp_path / "tls"
    )
    live = MqttClient(settings.MQTT_TLS_PORT, client_id="device-live-cert", tls=files, host="localhost")
    try:
        assert live.connect_outcome() == "connected"
        serial = issued.json()["serial"]
        started = time.monotonic()
        response = api(support).post(
            f"/api/v1/devices/device-live-cert/certificates/{serial}/revoke/", {"reason": "key leaked"}, format="json"
        )
        assert response.status_code == 200
        assert live.wait_disconnected(15.0), celery_worker.log()[-3000:]
        elapsed = time.monotonic() - started
        assert elapsed < 15
        again = MqttClient(settings.MQTT_TLS_PORT, client_id="device-live-cert", tls=files, host="localhost")
        try:
            assert again.connect_outcome().startswith("refused")
        finally:
            again.close()
    finally:
        live.close()
    assert DeviceCertificate.objects.get(serial=serial).status == "revoked"
    assert AuditEvent.objects.filter(action="certificate.session_cut_off", object_id="device-live-cert").exists()
