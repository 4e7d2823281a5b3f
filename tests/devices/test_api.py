"""The inventory REST API (/api/v1/devices/, /models/, /groups/, /imports/) as automation uses it."""

import time
from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from devices.models import Device, DeviceGroup, DeviceModel, ImportJob
from security.models import AuditEvent
from tests.factories import PASSWORD, DeviceFactory, DeviceGroupFactory, DeviceModelFactory

pytestmark = pytest.mark.django_db

DEVICES = "/api/v1/devices/"


@pytest.fixture
def api(operator):
    client = APIClient()
    client.force_authenticate(operator)
    return client


def device_url(client_id: str) -> str:
    return f"{DEVICES}{client_id}/"


def client_ids(response) -> list[str]:
    assert response.status_code == 200, response.content
    return [row["client_id"] for row in response.json()["results"]]


# --- CRUD ---------------------------------------------------------------------------------------------------


def test_create_device_with_model_and_groups_by_name(api, operator):
    DeviceModelFactory(name="TH-1")
    DeviceGroupFactory(name="plant-a")
    DeviceGroupFactory(name="plant-b")
    response = api.post(
        DEVICES,
        {
            "client_id": "device-th1-0001",
            "name": "Boiler",
            "model": "TH-1",
            "groups": ["plant-a", "plant-b"],
            "serial": "SN1",
            "mac": "00-1A-2B-3C-4D-5E",
            "firmware_version": "1.2.0",
        },
        format="json",
    )
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["client_id"] == "device-th1-0001"
    assert body["model"] == "TH-1"
    assert sorted(body["groups"]) == ["plant-a", "plant-b"]
    assert body["mac"] == "00:1a:2b:3c:4d:5e"
    assert body["status"] == "active"
    assert body["last_seen"] is None
    assert body["url"].endswith("/api/v1/devices/device-th1-0001/")
    device = Device.objects.get(client_id="device-th1-0001")
    assert sorted(device.groups.values_list("name", flat=True)) == ["plant-a", "plant-b"]
    event = AuditEvent.objects.get(action="device.create")
    assert event.actor == operator and event.object_id == "device-th1-0001"


def test_retrieve_device_by_client_id(api):
    DeviceFactory(client_id="device-abc_1", name="Pump", model=DeviceModelFactory(name="P-2"))
    response = api.get(device_url("device-abc_1"))
    assert response.status_code == 200
    assert response.json()["name"] == "Pump"
    assert response.json()["model"] == "P-2"
    assert api.get(device_url("device-missing")).status_code == 404
    assert api.get(device_url("not a device")).status_code == 404


def test_patch_changes_fields_and_is_audited(api, operator):
    DeviceFactory(client_id="device-1", name="old", firmware_version="1.0")
    DeviceGroupFactory(name="g1")
    response = api.patch(device_url("device-1"), {"name": "new", "groups": ["g1"]}, format="json")
    assert response.status_code == 200, response.content
    assert response.json()["name"] == "new"
    assert response.json()["groups"] == ["g1"]
    assert response.json()["firmware_version"] == "1.0"
    event = AuditEvent.objects.get(action="device.update")
    assert event.actor == operator
    assert event.before["name"] == "old" and event.after["name"] == "new"
    assert event.after["groups"] == ["g1"]


def test_patch_can_clear_the_model(api):
    DeviceFactory(client_id="device-1")
    response = api.patch(device_url("device-1"), {"model": None}, format="json")
    assert response.status_code == 200
    assert response.json()["model"] is None
    assert Device.objects.get(client_id="device-1").model is None


def test_put_replaces_editable_fields(api):
    DeviceFactory(client_id="device-1", name="old", serial="S1")
    response = api.put(device_url("device-1"), {"client_id": "device-1", "name": "fresh"}, format="json")
    assert response.status_code == 200, response.content
    device = Device.objects.get(client_id="device-1")
    assert device.name == "fresh"


def test_delete_device_is_audited(api, operator):
    DeviceFactory(client_id="device-gone", name="x")
    response = api.delete(device_url("device-gone"))
    assert response.status_code == 204
    assert not Device.objects.filter(client_id="device-gone").exists()
    event = AuditEvent.objects.get(action="device.delete")
    assert event.actor == operator and event.object_id == "device-gone" and event.before["name"] == "x"


# --- bad input: 400 with a message per field, never a 500 -------------------------------------------------


def test_duplicate_client_id_is_400_naming_the_field(api):
    DeviceFactory(client_id="device-1")
    response = api.post(DEVICES, {"client_id": "device-1"}, format="json")
    assert response.status_code == 400
    assert "already exists" in response.json()["client_id"][0]
    assert Device.objects.count() == 1


def test_bad_prefix_is_400_with_the_rule(api):
    response = api.post(DEVICES, {"client_id": "sensor-1"}, format="json")
    assert response.status_code == 400
    message = response.json()["client_id"][0]
    assert "does not match the fleet rule" in message and "'device-'" in message
    for bad in ("device-a/b", "device-#", "device-+", "device-$SYS", "device-"):
        response = api.post(DEVICES, {"client_id": bad}, format="json")
        assert response.status_code == 400, bad
        assert "client_id" in response.json()
    assert not Device.objects.exists()


def test_service_validation_errors_become_400_per_field(api, settings):
    # A permissive fleet pattern lets the serializer's pattern through; the service's full_clean() still
    # refuses MQTT wildcards, and the API turns that into a 400 naming the field (not a 500).
    settings.FLEET_CLIENT_ID_SUFFIX_PATTERN = r".{1,64}"
    response = api.post(DEVICES, {"client_id": "device-a+b"}, format="json")
    assert response.status_code == 400
    assert "does not match the fleet rule" in response.json()["client_id"][0]
    assert not Device.objects.exists()


def test_bad_mac_is_400_naming_the_field(api):
    response = api.post(DEVICES, {"client_id": "device-1", "mac": "zz:zz"}, format="json")
    assert response.status_code == 400
    assert "is not a MAC address" in response.json()["mac"][0]
    assert not Device.objects.exists()


def test_unknown_model_and_group_are_400_naming_the_field(api):
    DeviceGroupFactory(name="known")
    response = api.post(
        DEVICES, {"client_id": "device-1", "model": "Nope-9", "groups": ["known", "ghost"]}, format="json"
    )
    assert response.status_code == 400
    body = response.json()
    assert "Unknown model 'Nope-9'" in body["model"][0]
    assert "Unknown group 'ghost'" in str(body["groups"])
    assert not Device.objects.exists()


def test_missing_client_id_is_400(api):
    response = api.post(DEVICES, {"name": "x"}, format="json")
    assert response.status_code == 400
    assert response.json()["client_id"] == ["This field is required."]


def test_malformed_json_is_400(api):
    response = api.generic("POST", DEVICES, '{"client_id": "device-1",', content_type="application/json")
    assert response.status_code == 400
    assert "JSON parse error" in response.json()["detail"]


@pytest.mark.parametrize(
    "payload, field",
    [
        ({"client_id": 42}, "client_id"),
        ({"client_id": "device-1", "groups": "plant-a"}, "groups"),
        ({"client_id": "device-1", "groups": [1, 2]}, "groups"),
        ({"client_id": "device-1", "model": {"name": "x"}}, "model"),
        ({"client_id": "device-1", "name": ["x"]}, "name"),
        ({"client_id": "device-1", "name": 7}, "name"),  # the schema says string: no silent coercion
        ({"client_id": "device-1", "firmware_version": 1.5}, "firmware_version"),
        ({"client_id": "device-1", "name": "x" * 201}, "name"),
    ],
)
def test_wrong_types_are_400_naming_the_field(api, payload, field):
    DeviceGroupFactory(name="plant-a")
    response = api.post(DEVICES, payload, format="json")
    assert response.status_code == 400, response.content
    assert field in response.json()
    assert not Device.objects.exists()


def test_a_json_list_instead_of_an_object_is_400(api):
    response = api.post(DEVICES, [{"client_id": "device-1"}], format="json")
    assert response.status_code == 400
    assert "Expected a dictionary" in str(response.json())


def test_patch_status_is_400_pointing_at_the_actions(api):
    DeviceFactory(client_id="device-1")
    response = api.patch(device_url("device-1"), {"status": "revoked"}, format="json")
    assert response.status_code == 400
    message = response.json()["status"][0]
    assert "revoke" in message and "quarantine" in message and "separate actions" in message
    assert Device.objects.get(client_id="device-1").status == "active"
    assert not AuditEvent.objects.filter(action="device.update").exists()


def test_patch_client_id_is_400(api):
    DeviceFactory(client_id="device-1")
    response = api.patch(device_url("device-1"), {"client_id": "device-2"}, format="json")
    assert response.status_code == 400
    assert "cannot be changed" in response.json()["client_id"][0]
    assert Device.objects.filter(client_id="device-1").exists()


# --- filters, search, ordering, pagination -------------------------------------------------------------------


@pytest.fixture
def fleet():
    th, pm = DeviceModelFactory(name="TH-1"), DeviceModelFactory(name="PM-2")
    north, south = DeviceGroupFactory(name="north"), DeviceGroupFactory(name="south")
    now = timezone.now()
    a = DeviceFactory(client_id="device-a", name="Alpha boiler", model=th, firmware_version="1.0", last_seen=now)
    b = DeviceFactory(
        client_id="device-b", name="Bravo pump", model=pm, firmware_version="2.0", last_seen=now - timedelta(days=2)
    )
    c = DeviceFactory(client_id="device-c", name="Charlie", model=th, firmware_version="2.0", serial="XYZ-77")
    d = DeviceFactory(
        client_id="device-d", name="Delta", model=pm, firmware_version="1.0", status="revoked", mac="00:1a:2b:3c:4d:5e"
    )
    a.groups.add(north)
    b.groups.add(north, south)
    c.groups.add(south)
    return [a, b, c, d]


@pytest.mark.parametrize(
    "query, expected",
    [
        ("status=revoked", ["device-d"]),
        ("status=active&status=revoked", ["device-a", "device-b", "device-c", "device-d"]),
        ("model=TH-1", ["device-a", "device-c"]),
        ("group=north", ["device-a", "device-b"]),
        ("group=south&model=PM-2", ["device-b"]),
        ("firmware=2.0", ["device-b", "device-c"]),
        ("seen=recent", ["device-a"]),
        ("seen=stale", ["device-b"]),
        ("seen=never", ["device-c", "device-d"]),
        ("search=pump", ["device-b"]),
        ("search=xyz-77", ["device-c"]),
        ("search=00:1A:2B", ["device-d"]),
        ("search=device-c", ["device-c"]),
    ],
)
def test_filters_and_search(api, fleet, query, expected):
    assert client_ids(api.get(f"{DEVICES}?{query}")) == expected


@pytest.mark.parametrize(
    "query, field",
    [
        ("status=exploded", "status"),
        ("model=Unknown", "model"),
        ("group=nowhere", "group"),
        ("seen=yesterday", "seen"),
        ("ordering=password", "ordering"),
    ],
)
def test_bad_filter_values_are_400_naming_the_parameter(api, fleet, query, field):
    response = api.get(f"{DEVICES}?{query}")
    assert response.status_code == 400
    assert field in response.json()


@pytest.mark.parametrize(
    "ordering, expected",
    [
        ("name", ["device-a", "device-b", "device-c", "device-d"]),
        ("-client_id", ["device-d", "device-c", "device-b", "device-a"]),
        ("model,-client_id", ["device-d", "device-b", "device-c", "device-a"]),
        ("firmware,client_id", ["device-a", "device-d", "device-b", "device-c"]),
        ("status,client_id", ["device-a", "device-b", "device-c", "device-d"]),
        ("-last_seen", None),
    ],
)
def test_ordering(api, fleet, ordering, expected):
    ids = client_ids(api.get(f"{DEVICES}?ordering={ordering}"))
    if expected is None:  # NULLs sort differently per database; the seen devices keep their order
        seen = [i for i in ids if i in {"device-a", "device-b"}]
        assert seen == ["device-a", "device-b"]
    else:
        assert ids == expected


def test_pagination_page_size_next_and_previous(api, settings):
    for n in range(7):
        DeviceFactory(client_id=f"device-p{n}")
    first = api.get(f"{DEVICES}?page_size=3")
    body = first.json()
    assert body["count"] == 7
    assert [d["client_id"] for d in body["results"]] == ["device-p0", "device-p1", "device-p2"]
    assert body["previous"] is None
    second = api.get(body["next"]).json()
    assert [d["client_id"] for d in second["results"]] == ["device-p3", "device-p4", "device-p5"]
    assert second["previous"] is not None
    last = api.get(second["next"]).json()
    assert [d["client_id"] for d in last["results"]] == ["device-p6"]
    assert last["next"] is None
    assert api.get(f"{DEVICES}?page_size=3&page=9").status_code == 404


def test_default_page_size_comes_from_settings(api):
    # REST_FRAMEWORK PAGE_SIZE is read when the pagination class is defined: the fleet default of 50.
    for n in range(52):
        DeviceFactory(client_id=f"device-{n:03d}")
    body = api.get(DEVICES).json()
    assert body["count"] == 52
    assert len(body["results"]) == 50
    assert body["next"] is not None


def test_list_query_count_does_not_grow_with_the_fleet(api, django_assert_max_num_queries):
    groups = [DeviceGroupFactory(name=f"g{n}") for n in range(3)]

    def grow(count):
        for _ in range(count):
            DeviceFactory().groups.set(groups)

    grow(10)
    with django_assert_max_num_queries(8) as small:
        assert api.get(f"{DEVICES}?page_size=200").status_code == 200
    grow(190)
    with django_assert_max_num_queries(len(small.captured_queries)):
        assert len(api.get(f"{DEVICES}?page_size=200").json()["results"]) == 200


# --- models and groups -----------------------------------------------------------------------------------------


def test_model_crud_and_in_use_model_cannot_be_deleted(api, operator):
    response = api.post("/api/v1/models/", {"name": "TH-1", "manufacturer": "Acme"}, format="json")
    assert response.status_code == 201, response.content
    url = response.json()["url"]
    assert response.json()["device_count"] == 0
    assert api.post("/api/v1/models/", {"name": "TH-1"}, format="json").status_code == 400
    response = api.patch(url, {"latest_firmware": "2.1"}, format="json")
    assert response.status_code == 200 and response.json()["latest_firmware"] == "2.1"
    DeviceFactory(client_id="device-1", model=DeviceModel.objects.get(name="TH-1"))
    listing = api.get("/api/v1/models/").json()
    assert [(m["name"], m["device_count"]) for m in listing["results"]] == [("TH-1", 1)]
    response = api.delete(url)
    assert response.status_code == 400
    assert "still use model 'TH-1'" in str(response.json())
    assert DeviceModel.objects.filter(name="TH-1").exists()
    Device.objects.all().delete()
    assert api.delete(url).status_code == 204
    actions = list(AuditEvent.objects.filter(object_type="devicemodel").values_list("action", flat=True))
    assert sorted(actions) == ["devicemodel.create", "devicemodel.delete", "devicemodel.update"]
    assert set(AuditEvent.objects.filter(object_type="devicemodel").values_list("actor", flat=True)) == {operator.pk}


def test_group_crud_leaves_devices_in_place(api):
    response = api.post("/api/v1/groups/", {"name": "north", "description": "site"}, format="json")
    assert response.status_code == 201
    url = response.json()["url"]
    device = DeviceFactory(client_id="device-1")
    device.groups.add(DeviceGroup.objects.get(name="north"))
    assert api.get("/api/v1/groups/?name=north").json()["results"][0]["device_count"] == 1
    response = api.put(url, {"name": "north-2", "description": ""}, format="json")
    assert response.status_code == 200 and response.json()["name"] == "north-2"
    assert api.get(device_url("device-1")).json()["groups"] == ["north-2"]
    assert api.delete(url).status_code == 204
    assert api.get(device_url("device-1")).json()["groups"] == []
    assert api.post("/api/v1/groups/", {"name": ""}, format="json").json()["name"] == ["This field may not be blank."]


# --- token authentication ----------------------------------------------------------------------------------


def test_obtain_a_token_and_use_it(operator):
    client = APIClient()
    response = client.post("/api/v1/auth/token/", {"username": operator.username, "password": PASSWORD}, format="json")
    assert response.status_code == 200
    key = response.json()["token"]
    assert Token.objects.get(user=operator).key == key
    event = AuditEvent.objects.get(action="auth.token_issue")
    assert event.actor == operator and key not in str(event.after)
    assert client.get(DEVICES).status_code == 401
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    assert client.get(DEVICES).status_code == 200
    client.credentials(HTTP_AUTHORIZATION="Token not-a-real-key")
    assert client.get(DEVICES).status_code == 401


def test_session_auth_needs_the_csrf_token(operator):
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(operator)
    assert client.get(DEVICES).status_code == 200
    response = client.post(DEVICES, {"client_id": "device-1"}, format="json")
    assert response.status_code == 403
    assert "CSRF" in response.json()["detail"]
    assert not Device.objects.exists()


def test_token_bad_password_is_400_with_a_message(operator):
    response = APIClient().post(
        "/api/v1/auth/token/", {"username": operator.username, "password": "wrong"}, format="json"
    )
    assert response.status_code == 400
    assert "Unable to log in with the given username and password" in response.json()["non_field_errors"][0]
    assert not Token.objects.exists()
    assert not AuditEvent.objects.filter(action="auth.token_issue").exists()
    response = APIClient().post("/api/v1/auth/token/", {"username": operator.username}, format="json")
    assert response.status_code == 400 and response.json()["password"] == ["This field is required."]


def test_token_endpoint_is_throttled(operator, monkeypatch):
    from django.core.cache import cache
    from rest_framework.throttling import ScopedRateThrottle

    # The test settings raise the rate so other tests never hit it; here it is what production has.
    monkeypatch.setattr(ScopedRateThrottle, "THROTTLE_RATES", {"token": "3/min"})
    cache.clear()
    client = APIClient()
    codes = [
        client.post("/api/v1/auth/token/", {"username": operator.username, "password": "x"}).status_code
        for _ in range(4)
    ]
    cache.clear()
    assert codes == [400, 400, 400, 429]


# --- CSV import ---------------------------------------------------------------------------------------------------


def test_import_without_a_file_is_400(api):
    response = api.post(f"{DEVICES}import/", {}, format="multipart")
    assert response.status_code == 400
    assert "multipart field 'file'" in response.json()["file"][0]
    assert not ImportJob.objects.exists()


def test_import_of_binary_is_400(api):
    from django.core.files.uploadedfile import SimpleUploadedFile

    upload = SimpleUploadedFile("fleet.csv", b"\xff\xfe\x00garbage", content_type="text/csv")
    response = api.post(f"{DEVICES}import/", {"file": upload}, format="multipart")
    assert response.status_code == 400
    assert "not UTF-8" in response.json()["file"][0]
    assert not ImportJob.objects.exists()


def test_import_creates_a_job_and_answers_202(api, operator):
    response = api.generic("POST", f"{DEVICES}import/", "client_id,name\ndevice-i1,one\n", content_type="text/csv")
    assert response.status_code == 202, response.content
    job = ImportJob.objects.get()
    assert response.json()["id"] == job.pk
    assert response.json()["state"] == "pending"
    assert response.json()["url"].endswith(f"/api/v1/imports/{job.pk}/")
    assert job.created_by == operator and job.content == "client_id,name\ndevice-i1,one\n"


def _wait_for_job(client, url, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(url).json()
        if body["done"]:
            return body
        time.sleep(0.1)
    raise AssertionError(f"import job did not finish: {body}")


@pytest.mark.integration
def test_import_is_run_to_completion_by_a_real_worker(transactional_db, celery_worker, user_with_role):
    # Committed data, since the worker is another process.
    from django.core.files.uploadedfile import SimpleUploadedFile

    operator = user_with_role("operator")
    DeviceModelFactory(name="TH-1")
    client = APIClient()
    client.force_authenticate(operator)

    good = SimpleUploadedFile(
        "fleet.csv", b"client_id,name,model\ndevice-w1,one,TH-1\ndevice-w2,two,\n", content_type="text/csv"
    )
    response = client.post(f"{DEVICES}import/", {"file": good}, format="multipart")
    assert response.status_code == 202, response.content
    body = _wait_for_job(client, response.json()["url"])
    assert body["state"] == "succeeded", celery_worker.log()[-3000:]
    assert (body["total_rows"], body["processed_rows"], body["imported_rows"]) == (2, 2, 2)
    assert body["errors"] == []
    assert client_ids(client.get(f"{DEVICES}?model=TH-1")) == ["device-w1"]

    # A file with one bad row imports nothing and names the line and the reason.
    response = client.generic(
        "POST",
        f"{DEVICES}import/",
        "client_id,mac\ndevice-w3,\nsensor-9,\ndevice-w4,zz\n",
        content_type="text/csv",
    )
    assert response.status_code == 202
    body = _wait_for_job(client, response.json()["url"])
    assert body["state"] == "failed"
    assert body["imported_rows"] == 0
    assert [e["line"] for e in body["errors"]] == [3, 4]
    assert "does not follow the fleet rule" in body["errors"][0]["reason"]
    assert "not a MAC address" in body["errors"][1]["reason"]
    assert not Device.objects.filter(client_id="device-w3").exists()


def test_unknown_api_address_with_a_newline_is_a_json_404(api):
    response = api.get("/api/v1/groups/%0Aabc/")
    assert response.status_code == 404
    assert response["Content-Type"] == "application/json"
