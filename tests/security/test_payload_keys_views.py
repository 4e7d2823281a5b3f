"""The device page's payload-key card, the page that shows a new payload key once, and the "required" setting."""

import pytest

from fleetkeeper_device import sealing
from security import payloads
from security.models import AuditEvent, PayloadKey
from tests.factories import DeviceFactory

pytestmark = pytest.mark.django_db


def test_issue_page_shows_the_key_once_and_is_never_cached(client, operator):
    device = DeviceFactory()
    client.force_login(operator)
    card = client.get(f"/devices/{device.client_id}/payload-key/")
    assert card.status_code == 200 and b'id="payload-key-none"' in card.content
    assert b"Issue a payload key" in card.content

    response = client.post(f"/devices/{device.client_id}/payload-key/issue/", {"required": "yes"})
    assert response.status_code == 200
    assert response["Cache-Control"] == "no-store"
    row = PayloadKey.objects.get(device=device)
    text = response.context["issued"].key_text
    assert sealing.key_id(sealing.decode_key(text)).hex() == row.key_id and row.required is True
    assert text.encode() in response.content and b"Shown once." in response.content

    # Never again: not on the card, not on a reload (a GET goes back to the device), not in the audit log.
    card = client.get(f"/devices/{device.client_id}/payload-key/")
    assert row.key_id.encode() in card.content and text.encode() not in card.content
    assert b"Issue a new payload key" in card.content
    again = client.get(f"/devices/{device.client_id}/payload-key/issue/")
    assert again.status_code == 302 and again["Location"] == f"/devices/{device.client_id}/"
    page = client.get(f"/devices/{device.client_id}/")
    assert text.encode() not in page.content and b"device-payload-key" in page.content
    assert not AuditEvent.objects.filter(after__icontains=text.split(".", 1)[1]).exists()
    assert AuditEvent.objects.filter(action="payload_key.issue", object_id=device.client_id).exists()


def test_required_setting_is_changed_from_the_card_and_audited(client, operator):
    device = DeviceFactory()
    payloads.payload_key_issue(actor=operator, device=device)
    client.force_login(operator)
    response = client.post(f"/devices/{device.client_id}/payload-key/require/", {"required": "yes"}, follow=True)
    assert b"sealed payloads are now required" in response.content
    assert PayloadKey.objects.get(device=device).required is True
    assert AuditEvent.objects.get(action="payload_key.require").after["required"] is True
    client.post(f"/devices/{device.client_id}/payload-key/require/", {"required": ""})
    assert PayloadKey.objects.get(device=device).required is None


def test_issuing_for_a_revoked_device_says_what_to_do(client, operator):
    device = DeviceFactory(status="revoked")
    client.force_login(operator)
    response = client.post(f"/devices/{device.client_id}/payload-key/issue/", follow=True)
    assert b"reinstate it before issuing a payload key" in response.content
    assert not PayloadKey.objects.exists()


@pytest.mark.parametrize("role", ["support", "auditor"])
def test_readers_see_the_card_without_the_buttons_and_cannot_issue(client, role, request):
    user = request.getfixturevalue(role)
    device = DeviceFactory()
    client.force_login(user)
    card = client.get(f"/devices/{device.client_id}/payload-key/")
    assert card.status_code == 200 and b"payload-key-issue" not in card.content
    assert client.post(f"/devices/{device.client_id}/payload-key/issue/").status_code == 403
    assert client.post(f"/devices/{device.client_id}/payload-key/require/", {"required": "yes"}).status_code == 403
    assert not PayloadKey.objects.exists()
