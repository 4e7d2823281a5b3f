"""The audit log page: who may read it, what each event shows, filters, pagination, and no way to change it."""

import re

import pytest
from django.test import Client
from django.urls import reverse

from devices import services
from security.audit import audit_context
from security.models import AuditEvent
from tests.factories import DeviceFactory


@pytest.mark.parametrize(
    "role,expected",
    [("admin", 200), ("auditor", 200), ("operator", 403), ("support", 403), (None, 403), ("anonymous", 302)],
    ids=lambda v: str(v),
)
def test_audit_log_page_for_every_role(role, expected, user_with_role):
    client = Client()
    if role != "anonymous":
        client.force_login(user_with_role(role))
    response = client.get(reverse("audit-log"))
    assert response.status_code == expected
    if expected == 302:
        assert response["Location"].startswith(reverse("login"))
    if expected == 403:
        assert "Your role does not allow this" in response.content.decode()


def test_each_event_shows_who_what_when_where_and_the_change(client, auditor, operator):
    with audit_context(source_address="10.1.2.3", request_id="req-abc123"):
        device = services.device_create(actor=operator, client_id="device-audited", name="Before")
        services.device_update(actor=operator, device=device, data={"name": "After"})
    client.force_login(auditor)
    page = client.get(reverse("audit-log")).content.decode()
    rows = re.findall(r"<tr>(.*?)</tr>", page.split("<tbody>", 1)[1], re.S)
    assert len(rows) == 2
    update = rows[0]  # newest first
    assert "operator-user" in update and "device.update" in update
    assert 'href="/devices/device-audited/"' in update
    assert "10.1.2.3" in update and "req-abc123" in update
    assert re.search(r'name</span>: <span class="before">Before</span> → <span class="after">After</span>', update)
    event = AuditEvent.objects.get(action="device.update")
    assert event.created.strftime("%Y-%m-%d %H:%M:%S") in update
    assert "device.create" in rows[1]
    assert "{#" not in page and "{%" not in page and "{{" not in page


def test_filters_and_pagination(client, auditor, operator, settings):
    settings.FLEET_PAGE_SIZE = 3
    for n in range(5):
        DeviceFactory(client_id=f"device-a{n}")
        services.device_delete(actor=operator, device=DeviceFactory(client_id=f"device-del{n}"))
    with audit_context(service="importer"):
        services.device_create(actor=None, client_id="device-by-service")
    client.force_login(auditor)

    page = client.get(reverse("audit-log"), {"action": "device.delete"}).content.decode()
    assert "<strong>5</strong> events match the filters" in page
    assert "Page 1 of 2" in page
    assert 'href="?action=device.delete&amp;page=2"' in page
    assert "device.create" not in page.split("<tbody>", 1)[1]

    page = client.get(reverse("audit-log"), {"actor": "service:importer"}).content.decode()
    assert "<strong>1</strong> event matches the filters" in page and "device-by-service" in page

    page = client.get(reverse("audit-log"), {"object_type": "device", "object_id": "device-del3"}).content.decode()
    assert "<strong>1</strong> event matches" in page

    page = client.get(reverse("audit-log"), {"actor": "nobody"}).content.decode()
    assert "No events match these filters" in page


def test_audit_log_is_read_only(client, auditor, admin_user_role, operator):
    services.device_create(actor=operator, client_id="device-ro")
    for user in (auditor, admin_user_role):
        client.force_login(user)
        page = client.get(reverse("audit-log")).content.decode()
        assert 'method="post"' not in page.split("<main", 1)[1].replace(
            f'<form method="post" action="{reverse("logout")}">', ""
        )
        for method in (client.post, client.put, client.delete):
            assert method(reverse("audit-log")).status_code == 405
    assert AuditEvent.objects.count() == 1
