"""The inventory pages in the browser UI: who may open what, and that changes made through the forms are
validated, saved through the services and written to the audit log."""

import csv
import io
import re
from datetime import timedelta

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from devices.models import Device, DeviceGroup, DeviceModel, ImportJob
from security.models import AuditEvent
from tests.factories import PASSWORD, DeviceFactory, DeviceGroupFactory, DeviceModelFactory

ROLES = ["admin", "operator", "support", "auditor", None, "anonymous"]
EVERY_ROLE = {"admin", "operator", "support", "auditor"}
FLEET_MANAGERS = {"admin", "operator"}
READERS_OF_IMPORTS = {"admin", "operator", "auditor"}


@pytest.fixture
def inventory(db):
    model = DeviceModelFactory(name="Thermo-1")
    group = DeviceGroupFactory(name="north")
    device = DeviceFactory(client_id="device-matrix", name="Matrix", model=model)
    device.groups.add(group)
    job = ImportJob.objects.create(filename="old.csv", content="client_id\n")
    return {"model": model, "group": group, "device": device, "job": job}


PAGES = [
    ("overview", lambda o: reverse("overview"), EVERY_ROLE),
    ("device-list", lambda o: reverse("device-list"), EVERY_ROLE),
    ("device-detail", lambda o: reverse("device-detail", args=[o["device"].client_id]), EVERY_ROLE),
    ("device-add", lambda o: reverse("device-add"), FLEET_MANAGERS),
    ("device-edit", lambda o: reverse("device-edit", args=[o["device"].client_id]), FLEET_MANAGERS),
    ("device-delete", lambda o: reverse("device-delete", args=[o["device"].client_id]), FLEET_MANAGERS),
    ("device-export", lambda o: reverse("device-export"), READERS_OF_IMPORTS),
    ("devicemodel-list", lambda o: reverse("devicemodel-list"), EVERY_ROLE),
    ("devicemodel-add", lambda o: reverse("devicemodel-add"), FLEET_MANAGERS),
    ("devicemodel-edit", lambda o: reverse("devicemodel-edit", args=[o["model"].pk]), FLEET_MANAGERS),
    ("devicemodel-delete", lambda o: reverse("devicemodel-delete", args=[o["model"].pk]), FLEET_MANAGERS),
    ("devicegroup-list", lambda o: reverse("devicegroup-list"), EVERY_ROLE),
    ("devicegroup-add", lambda o: reverse("devicegroup-add"), FLEET_MANAGERS),
    ("devicegroup-edit", lambda o: reverse("devicegroup-edit", args=[o["group"].pk]), FLEET_MANAGERS),
    ("devicegroup-delete", lambda o: reverse("devicegroup-delete", args=[o["group"].pk]), FLEET_MANAGERS),
    ("import-list", lambda o: reverse("import-list"), READERS_OF_IMPORTS),
    ("import-create", lambda o: reverse("import-create"), FLEET_MANAGERS),
    ("import-detail", lambda o: reverse("import-detail", args=[o["job"].pk]), READERS_OF_IMPORTS),
]


def client_for(role, user_with_role):
    client = Client()
    if role != "anonymous":
        client.force_login(user_with_role(role))
    return client


@pytest.mark.parametrize("role", ROLES, ids=lambda r: str(r or "no-role"))
@pytest.mark.parametrize("name,url,allowed", PAGES, ids=[p[0] for p in PAGES])
def test_every_page_for_every_role(role, name, url, allowed, inventory, user_with_role):
    address = url(inventory)
    response = client_for(role, user_with_role).get(address)
    if role == "anonymous":
        assert response.status_code == 302
        assert response["Location"].startswith(reverse("login") + "?next=")
    elif role in allowed:
        assert response.status_code == 200
    else:
        assert response.status_code == 403
        assert "Your role does not allow this" in response.content.decode()


@pytest.mark.parametrize("role", ["support", "auditor", None])
def test_roles_without_the_right_cannot_change_anything_by_posting(role, inventory, user_with_role):
    client = client_for(role, user_with_role)
    device, model = inventory["device"], inventory["model"]
    posts = [
        (reverse("device-add"), {"client_id": "device-intruder"}),
        (reverse("device-edit", args=[device.client_id]), {"name": "changed"}),
        (reverse("device-delete", args=[device.client_id]), {}),
        (reverse("devicemodel-edit", args=[model.pk]), {"name": "changed"}),
        (reverse("devicemodel-delete", args=[model.pk]), {}),
        (reverse("devicegroup-add"), {"name": "intruders"}),
        (reverse("import-create"), {"file": io.BytesIO(b"client_id\ndevice-x\n")}),
    ]
    events_before = AuditEvent.objects.count()
    for url, data in posts:
        assert client.post(url, data).status_code == 403, url
    device.refresh_from_db()
    model.refresh_from_db()
    assert device.name == "Matrix" and model.name == "Thermo-1"
    assert not Device.objects.filter(client_id="device-intruder").exists()
    assert not DeviceGroup.objects.filter(name="intruders").exists()
    assert ImportJob.objects.count() == 1
    assert AuditEvent.objects.count() == events_before


def test_navigation_shows_only_what_the_role_may_open(client, user_with_role):
    client.force_login(user_with_role("support"))
    page = client.get(reverse("device-list")).content.decode()
    assert reverse("device-list") in page and reverse("devicemodel-list") in page
    assert reverse("audit-log") not in page
    assert reverse("import-list") not in page
    assert ">Add device<" not in page and ">Import CSV<" not in page
    assert "support-user" in page and "Role: support" in page
    assert reverse("api-docs") in page

    client.force_login(user_with_role("auditor"))
    page = client.get(reverse("device-list")).content.decode()
    assert reverse("audit-log") in page and reverse("import-list") in page
    assert ">Add device<" not in page


def test_login_page_logs_in_and_logout_is_a_post(client, operator):
    page = client.get(reverse("login"))
    assert page.status_code == 200 and 'name="password"' in page.content.decode()
    bad = client.post(reverse("login"), {"username": operator.username, "password": "wrong"})
    assert "Please enter a correct username and password" in bad.content.decode()
    response = client.post(reverse("login"), {"username": operator.username, "password": PASSWORD})
    assert response.status_code == 302 and response["Location"] == reverse("overview")
    overview = client.get(reverse("overview")).content.decode()
    assert f'action="{reverse("logout")}"' in overview and 'method="post"' in overview
    assert client.get(reverse("logout")).status_code == 405
    client.post(reverse("logout"))
    assert client.get(reverse("overview")).status_code == 302


# --- create, edit, delete through the forms -----------------------------------------------------------------


def assert_audited(response, event: AuditEvent, actor):
    assert event.actor == actor
    assert event.actor_label == actor.username
    assert event.source_address == "127.0.0.1"
    assert event.request_id and event.request_id == response["X-Request-ID"]


def test_add_device_through_the_form(operator_client, operator):
    model = DeviceModelFactory(name="Thermo-2")
    north, south = DeviceGroupFactory(name="north"), DeviceGroupFactory(name="south")
    form = operator_client.get(reverse("device-add")).content.decode()
    assert 'name="client_id"' in form and 'name="status"' not in form
    response = operator_client.post(
        reverse("device-add"),
        {
            "client_id": "device-new-1",
            "name": "Boiler room",
            "model": model.pk,
            "groups": [north.pk, south.pk],
            "serial": "SN-1",
            "mac": "00-1A-2B-3C-4D-5E",
            "firmware_version": "1.2.0",
        },
    )
    assert response.status_code == 302
    assert response["Location"] == reverse("device-detail", args=["device-new-1"])
    device = Device.objects.get(client_id="device-new-1")
    assert device.mac == "00:1a:2b:3c:4d:5e"
    assert {g.name for g in device.groups.all()} == {"north", "south"}
    event = AuditEvent.objects.get(action="device.create", object_id="device-new-1")
    assert_audited(response, event, operator)
    assert event.after["groups"] == ["north", "south"]

    detail = operator_client.get(response["Location"]).content.decode()
    assert "Device device-new-1 added." in detail
    for text in ("Boiler room", "Thermo-2", "north", "south", "00:1a:2b:3c:4d:5e", "1.2.0", "device.create"):
        assert text in detail


@pytest.mark.parametrize(
    "data,field,message",
    [
        ({"client_id": "sensor-1"}, "client_id", "does not match the fleet rule"),
        ({"client_id": "device-a/#"}, "client_id", "does not match the fleet rule"),
        ({"client_id": ""}, "client_id", "This field is required."),
        ({"client_id": "device-ok", "mac": "zz:zz"}, "mac", "is not a MAC address"),
        ({"client_id": "device-taken"}, "client_id", "already in the inventory"),
    ],
    ids=["bad-prefix", "wildcard", "missing", "bad-mac", "duplicate"],
)
def test_bad_input_is_shown_next_to_the_field(operator_client, data, field, message):
    DeviceFactory(client_id="device-taken")
    response = operator_client.post(reverse("device-add"), data)
    assert response.status_code == 400
    page = response.content.decode()
    errors = re.search(rf'<ul class="errors" id="id_{field}_errors">(.*?)</ul>', page, re.S)
    assert errors and message in errors.group(1)
    assert Device.objects.count() == 1
    assert not AuditEvent.objects.filter(action="device.create").exists()


def test_edit_device_through_the_form(operator_client, operator):
    north = DeviceGroupFactory(name="north")
    device = DeviceFactory(client_id="device-edit-me", name="Old name", mac="")
    form = operator_client.get(reverse("device-edit", args=[device.client_id])).content.decode()
    assert 'value="Old name"' in form and 'name="client_id"' not in form
    response = operator_client.post(
        reverse("device-edit", args=[device.client_id]),
        {
            "client_id": "device-renamed",  # not on the form: ignored
            "status": "revoked",  # changed only by revoke/quarantine: ignored
            "name": "New name",
            "model": device.model.pk,
            "groups": [north.pk],
            "serial": device.serial,
            "mac": "001a2b3c4d5e",
            "firmware_version": "2.0.0",
        },
    )
    assert response.status_code == 302
    device.refresh_from_db()
    assert device.client_id == "device-edit-me" and device.status == "active"
    assert device.name == "New name" and device.mac == "00:1a:2b:3c:4d:5e" and device.firmware_version == "2.0.0"
    event = AuditEvent.objects.get(action="device.update")
    assert_audited(response, event, operator)
    assert event.before["name"] == "Old name" and event.after["name"] == "New name"
    assert event.before["groups"] == [] and event.after["groups"] == ["north"]
    detail = operator_client.get(response["Location"]).content.decode()
    assert "Old name" in detail and "New name" in detail  # the change, before -> after, in the activity list


def test_edit_with_a_bad_mac_keeps_the_device_unchanged(operator_client):
    device = DeviceFactory(client_id="device-keep", name="Keep")
    response = operator_client.post(
        reverse("device-edit", args=[device.client_id]), {"name": "Changed", "mac": "not-a-mac"}
    )
    assert response.status_code == 400
    assert "is not a MAC address" in response.content.decode()
    device.refresh_from_db()
    assert device.name == "Keep"
    assert not AuditEvent.objects.filter(action="device.update").exists()


def test_delete_device_asks_first_then_deletes(operator_client, operator):
    device = DeviceFactory(client_id="device-doomed", name="Doomed")
    device.groups.add(DeviceGroupFactory(name="north"))
    confirm = operator_client.get(reverse("device-delete", args=[device.client_id]))
    page = confirm.content.decode()
    assert "What will be lost" in page and "1 group" in page and "audit log keeps" in page
    assert Device.objects.filter(pk=device.pk).exists()

    response = operator_client.post(reverse("device-delete", args=[device.client_id]))
    assert response.status_code == 302 and response["Location"] == reverse("device-list")
    assert not Device.objects.filter(client_id="device-doomed").exists()
    event = AuditEvent.objects.get(action="device.delete")
    assert_audited(response, event, operator)
    assert event.object_id == "device-doomed" and event.before["name"] == "Doomed"
    assert "Device device-doomed deleted" in operator_client.get(response["Location"]).content.decode()


def test_missing_device_gets_a_friendly_404(operator_client):
    response = operator_client.get(reverse("device-detail", args=["device-nope"]))
    assert response.status_code == 404
    page = response.content.decode()
    assert "There is no device &#x27;device-nope&#x27; in the inventory." in page
    assert "Search devices" in page
    unknown = operator_client.get("/no/such/page/")
    assert unknown.status_code == 404 and "There is no page at" in unknown.content.decode()


def test_csrf_token_is_required_on_forms(operator):
    client = Client(enforce_csrf_checks=True)
    client.force_login(operator)
    refused = client.post(reverse("device-add"), {"client_id": "device-csrf"})
    assert refused.status_code == 403
    assert not Device.objects.filter(client_id="device-csrf").exists()

    device = DeviceFactory(client_id="device-keep-csrf")
    assert client.post(reverse("device-delete", args=[device.client_id])).status_code == 403
    assert Device.objects.filter(pk=device.pk).exists()
    assert not AuditEvent.objects.exists()

    # With the token from the form, the same post works: the check is what refused it above.
    page = client.get(reverse("device-add")).content.decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
    accepted = client.post(reverse("device-add"), {"client_id": "device-csrf", "csrfmiddlewaretoken": token})
    assert accepted.status_code == 302
    assert Device.objects.filter(client_id="device-csrf").exists()


def test_htmx_requests_carry_the_csrf_token(operator_client):
    page = operator_client.get(reverse("device-list")).content.decode()
    token = re.search(r"hx-headers='\{\"X-CSRFToken\": \"([^\"]+)\"\}'", page)
    assert token and len(token.group(1)) >= 32


# --- the device list --------------------------------------------------------------------------------------


def test_device_list_filters_sorts_and_keeps_filters_in_page_links(operator_client, settings):
    settings.FLEET_PAGE_SIZE = 5
    model = DeviceModelFactory(name="Thermo-3")
    other = DeviceModelFactory(name="Other")
    for n in range(12):
        DeviceFactory(client_id=f"device-t{n:02d}", name=f"thermo {n:02d}", model=model)
    DeviceFactory(client_id="device-other", name="thermo other", model=other)

    response = operator_client.get(
        reverse("device-list"), {"search": "thermo", "model": "Thermo-3", "ordering": "-name"}
    )
    page = response.content.decode()
    assert "<strong>12</strong> devices match the filters" in page
    shown = re.findall(r'class="mono" href="/devices/(device-[^/]+)/"', page)
    assert shown == ["device-t11", "device-t10", "device-t09", "device-t08", "device-t07"]
    assert "device-other" not in page
    assert "Page 1 of 3" in page
    assert 'href="?search=thermo&amp;model=Thermo-3&amp;ordering=-name&amp;page=2"' in page
    # The sorted column links to the reverse order, and the export keeps the filters.
    assert 'href="?search=thermo&amp;model=Thermo-3&amp;ordering=name"' in page
    assert 'href="/devices/export.csv?search=thermo&amp;model=Thermo-3&amp;ordering=-name"' in page

    last = operator_client.get(
        reverse("device-list"), {"search": "thermo", "model": "Thermo-3", "ordering": "-name", "page": 3}
    ).content.decode()
    assert re.findall(r'class="mono" href="/devices/(device-[^/]+)/"', last) == ["device-t01", "device-t00"]


def test_device_list_status_and_last_seen_filters(operator_client):
    now = timezone.now()
    DeviceFactory(client_id="device-fresh", last_seen=now)
    DeviceFactory(client_id="device-stale", last_seen=now - timedelta(days=2))
    DeviceFactory(client_id="device-never")
    DeviceFactory(client_id="device-revoked", status=Device.Status.REVOKED, last_seen=now)

    def ids(**params):
        page = operator_client.get(reverse("device-list"), params).content.decode()
        return set(re.findall(r'class="mono" href="/devices/(device-[^/]+)/"', page))

    assert ids(seen="recent") == {"device-fresh", "device-revoked"}
    assert ids(seen="never") == {"device-never"}
    assert ids(seen="stale") == {"device-stale"}
    assert ids(status="revoked") == {"device-revoked"}
    assert ids(status=["revoked", "active"], seen="never") == {"device-never"}


def test_live_search_returns_only_the_table(operator_client):
    DeviceFactory(client_id="device-findme", name="Find me")
    DeviceFactory(client_id="device-hidden", name="Hidden")
    response = operator_client.get(reverse("device-list"), {"search": "findme"}, headers={"HX-Request": "true"})
    page = response.content.decode()
    assert "<html" not in page and 'id="devices"' in page
    assert "device-findme" in page and "device-hidden" not in page
    assert "HX-Request" in response["Vary"]
    # A history restore after the cache expired needs the whole page.
    full = operator_client.get(
        reverse("device-list"),
        {"search": "findme"},
        headers={"HX-Request": "true", "HX-History-Restore-Request": "true"},
    )
    assert "<html" in full.content.decode()


def test_empty_states_say_what_to_do(operator_client, user_with_role, client):
    page = operator_client.get(reverse("device-list")).content.decode()
    assert "No devices yet" in page and reverse("device-add") in page and reverse("import-create") in page
    overview = operator_client.get(reverse("overview")).content.decode()
    assert "Your fleet is empty" in overview and reverse("device-add") in overview
    DeviceFactory(client_id="device-one")
    page = operator_client.get(reverse("device-list"), {"search": "zzz"}).content.decode()
    assert "No devices match these filters" in page
    client.force_login(user_with_role("support"))
    overview = client.get(reverse("overview")).content.decode()
    assert "Ask an operator" not in overview  # the fleet is not empty any more
    assert reverse("device-add") not in overview


def test_overview_counts_by_status_and_model(operator_client):
    model = DeviceModelFactory(name="Gateway-X")
    now = timezone.now()
    DeviceFactory.create_batch(3, model=model, last_seen=now)
    DeviceFactory.create_batch(2, model=model, status=Device.Status.QUARANTINED)
    DeviceFactory(client_id="device-nomodel", model=None)
    page = operator_client.get(reverse("overview")).content.decode()
    assert "6 devices</a> in the inventory" in page
    assert re.search(r"Quarantined</span></div>\s*<div class=\"value\">2<", page)
    assert re.search(r"Active</span></div>\s*<div class=\"value\">4<", page)
    assert re.search(r"Gateway-X</a></td>\s*<td class=\"num\">5<", page)
    assert "No model" in page
    assert re.search(r"Never seen</div><div class=\"value\">3<", page)
    assert "device-nomodel" in page  # listed among the devices never seen


def test_device_detail_shows_everything(operator_client):
    device = DeviceFactory(client_id="device-detail-1", name="Pump", serial="SN-9", mac="00:11:22:33:44:55")
    device.groups.add(DeviceGroupFactory(name="east"))
    page = operator_client.get(reverse("device-detail", args=[device.client_id])).content.decode()
    for text in ("device-detail-1", "Pump", "SN-9", "00:11:22:33:44:55", "east", device.model.name, "Active"):
        assert text in page
    assert reverse("device-edit", args=[device.client_id]) in page
    assert reverse("device-delete", args=[device.client_id]) in page


def test_device_detail_hides_edit_and_delete_from_readers(client, auditor):
    device = DeviceFactory(client_id="device-ro")
    client.force_login(auditor)
    page = client.get(reverse("device-detail", args=[device.client_id])).content.decode()
    assert reverse("device-edit", args=[device.client_id]) not in page
    assert reverse("device-delete", args=[device.client_id]) not in page


# --- CSV export -------------------------------------------------------------------------------------------


def read_csv(response) -> list[list[str]]:
    return list(csv.reader(io.StringIO(b"".join(response.streaming_content).decode())))


def test_export_returns_the_filtered_devices(client, auditor):
    group = DeviceGroupFactory(name="west")
    for n in range(3):
        DeviceFactory(client_id=f"device-west-{n}", name=f"=cmd {n}").groups.add(group)
    DeviceFactory(client_id="device-elsewhere")
    client.force_login(auditor)
    response = client.get(reverse("device-export"), {"group": "west", "ordering": "-client_id", "page": "2"})
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/csv")
    assert "attachment" in response["Content-Disposition"]
    rows = read_csv(response)
    assert rows[0][:7] == ["client_id", "name", "model", "groups", "serial", "mac", "firmware_version"]
    assert [r[0] for r in rows[1:]] == ["device-west-2", "device-west-1", "device-west-0"]
    assert rows[1][1] == "'=cmd 2"  # a spreadsheet must not run it as a formula
    assert rows[1][3] == "west"
    everything = read_csv(client.get(reverse("device-export")))
    assert len(everything) == 5


# --- device models and groups -----------------------------------------------------------------------------


def test_device_model_create_edit_delete(operator_client, operator):
    response = operator_client.post(
        reverse("devicemodel-add"), {"name": "Valve-9", "manufacturer": "Acme", "latest_firmware": "3.1"}
    )
    assert response.status_code == 302
    model = DeviceModel.objects.get(name="Valve-9")
    assert_audited(response, AuditEvent.objects.get(action="devicemodel.create"), operator)
    listing = operator_client.get(reverse("devicemodel-list")).content.decode()
    assert "Valve-9" in listing and "Acme" in listing

    duplicate = operator_client.post(reverse("devicemodel-add"), {"name": "Valve-9"})
    assert duplicate.status_code == 400 and "already exists" in duplicate.content.decode()

    response = operator_client.post(
        reverse("devicemodel-edit", args=[model.pk]), {"name": "Valve-10", "manufacturer": "Acme"}
    )
    assert response.status_code == 302
    event = AuditEvent.objects.get(action="devicemodel.update")
    assert event.before["name"] == "Valve-9" and event.after["name"] == "Valve-10"

    assert (
        "No device uses this model"
        in operator_client.get(reverse("devicemodel-delete", args=[model.pk])).content.decode()
    )
    response = operator_client.post(reverse("devicemodel-delete", args=[model.pk]))
    assert response.status_code == 302
    assert not DeviceModel.objects.filter(pk=model.pk).exists()
    assert_audited(response, AuditEvent.objects.get(action="devicemodel.delete"), operator)


def test_deleting_a_model_in_use_explains_why_not(operator_client):
    model = DeviceModelFactory(name="Busy")
    DeviceFactory.create_batch(2, model=model)
    confirm = operator_client.get(reverse("devicemodel-delete", args=[model.pk])).content.decode()
    assert "2 devices use this model" in confirm
    response = operator_client.post(reverse("devicemodel-delete", args=[model.pk]))
    assert response.status_code == 409
    assert (
        "2 device(s) still use model &#x27;Busy&#x27;; move them to another model first." in response.content.decode()
    )
    assert DeviceModel.objects.filter(pk=model.pk).exists()


def test_device_group_create_and_delete_keeps_the_devices(operator_client, operator):
    response = operator_client.post(reverse("devicegroup-add"), {"name": "roof", "description": "On the roof"})
    assert response.status_code == 302
    group = DeviceGroup.objects.get(name="roof")
    device = DeviceFactory(client_id="device-roof")
    device.groups.add(group)
    listing = operator_client.get(reverse("devicegroup-list")).content.decode()
    assert "On the roof" in listing and 'href="/devices/?group=roof">1<' in listing
    assert (
        "removes it from 1 device"
        in operator_client.get(reverse("devicegroup-delete", args=[group.pk])).content.decode()
    )
    response = operator_client.post(reverse("devicegroup-delete", args=[group.pk]))
    assert response.status_code == 302
    assert not DeviceGroup.objects.filter(pk=group.pk).exists()
    assert Device.objects.filter(client_id="device-roof").exists()
    assert_audited(response, AuditEvent.objects.get(action="devicegroup.delete"), operator)


@pytest.mark.parametrize("name,url,allowed", PAGES, ids=[p[0] for p in PAGES])
def test_no_template_syntax_leaks_into_pages(name, url, allowed, inventory, admin_user_role, client):
    client.force_login(admin_user_role)
    response = client.get(url(inventory))
    if response.get("Content-Type", "").startswith("text/html"):
        page = response.content.decode()
        for token in ("{#", "#}", "{%", "%}", "{{", "}}"):
            assert token not in page, f"{name}: {token!r} in the page"
