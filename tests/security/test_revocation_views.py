"""The revoke / quarantine / reinstate pages, the device page's security panel, and the alert link."""

import pytest

from devices.models import Device
from security.models import AuditEvent, DeviceAction, DeviceCredential, EnforcementChange
from security.revocation import device_action_request
from tests.factories import DeviceFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def device(db):
    return DeviceFactory(client_id="device-page1")


def test_alert_link_opens_the_confirm_page_with_the_alert_and_a_reason(client, support, device):
    client.force_login(support)
    page = client.get("/devices/device-page1/revoke/?alert=42")
    html = page.content.decode()
    assert page.status_code == 200
    assert "Alert #42" in html and 'name="alert" value="42"' in html and "Revoke device" in html


def test_revoke_needs_a_reason_and_a_confirmation(client, support, device):
    client.force_login(support)
    response = client.post("/devices/device-page1/revoke/", {"reason": "", "confirm": "on"})
    assert response.status_code == 400
    response = client.post("/devices/device-page1/revoke/", {"reason": "stolen"})
    assert response.status_code == 400
    assert Device.objects.get(pk=device.pk).status == "active" and not DeviceAction.objects.exists()
    response = client.post("/devices/device-page1/revoke/", {"reason": "stolen", "confirm": "on", "alert": "42"})
    assert response.status_code == 302 and response["Location"] == "/devices/device-page1/"
    record = DeviceAction.objects.get()
    assert (record.action, record.reason, record.alert_id, record.state) == ("revoke", "stolen", 42, "pending")
    assert record.requested_by == support and record.source_address == "127.0.0.1"
    event = AuditEvent.objects.get(action="device.revoke")
    assert event.actor == support and event.after["reason"] == "stolen"
    # The device page shows it pending, and polls until verified.
    html = client.get("/devices/device-page1/").content.decode()
    assert "revocation pending" in html and 'hx-trigger="every 1s"' in html


def test_device_page_shows_the_verification_with_milliseconds(client, support, device):
    from django.utils import timezone

    record = device_action_request(actor=support, device=device, action="revoke", reason="leaked key")
    verified_at = timezone.now().replace(microsecond=120_000)
    DeviceAction.objects.filter(pk=record.pk).update(
        state="verified",
        verified_at=verified_at,
        evidence={
            "checked_at": verified_at.isoformat(),
            "broker": "127.0.0.1:1883",
            "policy_digest": "ab" * 32,
            "generation": "cd" * 12,
            "generation_loaded": True,
            "in_password_file": False,
            "connect_attempt": {
                "username": "device-page1",
                "password": "random, never issued",
                "code": 5,
                "refused": True,
            },
        },
    )
    client.force_login(support)
    html = client.get("/devices/device-page1/security/").content.decode()
    assert f"verified refused at {timezone.localtime(verified_at):%Y-%m-%d %H:%M:%S}.120" in html
    assert "refused (code 5)" in html and "every 1s" not in html


def test_roles_on_the_pages(client, operator, support, auditor, device):
    client.force_login(auditor)
    assert client.get("/devices/device-page1/revoke/").status_code == 403
    assert client.post("/devices/device-page1/quarantine/", {"reason": "x", "confirm": "on"}).status_code == 403
    client.force_login(operator)
    assert client.get("/devices/device-page1/revoke/").status_code == 403
    client.force_login(support)
    html = client.get("/devices/device-page1/").content.decode()
    assert "/devices/device-page1/revoke/" in html and "/devices/device-page1/quarantine/" in html
    assert "/devices/device-page1/reinstate/" not in html
    assert client.get("/devices/device-page1/reinstate/").status_code == 403


def test_reinstating_a_revoked_device_says_it_needs_a_new_secret(client, operator, support, device):
    from security.services import credential_issue

    credential_issue(actor=operator, device=device)
    device_action_request(actor=support, device=device, action="revoke", reason="lost")
    assert not DeviceCredential.objects.filter(device=device).exists()
    client.force_login(operator)
    page = client.get("/devices/device-page1/reinstate/").content.decode()
    assert "its secret was deleted" in page
    response = client.post("/devices/device-page1/reinstate/", {"reason": "found", "confirm": "on"}, follow=True)
    html = response.content.decode()
    assert "has no secret" in html and "Issue secret" in html
    assert Device.objects.get(pk=device.pk).status == "active"


def test_a_later_action_supersedes_a_pending_one_and_wrong_states_are_refused(client, support, operator, device):
    first = device_action_request(actor=support, device=device, action="quarantine", reason="odd")
    second = device_action_request(actor=support, device=device, action="revoke", reason="worse")
    assert DeviceAction.objects.get(pk=first.pk).state == "superseded"
    assert second.change == EnforcementChange.objects.filter(kind="device.revoke").get()
    client.force_login(support)
    response = client.post("/devices/device-page1/quarantine/", {"reason": "again", "confirm": "on"})
    assert response.status_code in (200, 409) and "cannot be" in response.content.decode()
