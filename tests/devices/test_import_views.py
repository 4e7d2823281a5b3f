"""CSV import in the browser: upload, a real Celery worker runs the job, the job page shows the outcome."""

import re
import time

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.urls import reverse

from devices.models import Device, ImportJob
from security.models import AuditEvent
from tests.factories import DeviceFactory, DeviceGroupFactory, DeviceModelFactory


def upload(client, content: bytes, name="devices.csv"):
    return client.post(reverse("import-create"), {"file": SimpleUploadedFile(name, content, "text/csv")})


def wait_for_job_page(client, url: str, worker, timeout: float = 30) -> str:
    """Poll the way the page does (an htmx request for the status fragment) until the job is done."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fragment = client.get(url, headers={"HX-Request": "true"}).content.decode()
        state = re.search(r'data-state="(\w+)"', fragment).group(1)
        if state in {"succeeded", "failed"}:
            assert "hx-trigger" not in fragment  # done: the page stops polling
            return client.get(url).content.decode()
        assert 'hx-trigger="every 1s"' in fragment
        time.sleep(0.2)
    raise AssertionError(f"import not finished after {timeout}s:\n{worker.log()[-3000:]}")


@pytest.fixture
def import_client(transactional_db, user_with_role):
    """The worker is another process and must see committed rows, hence transactional_db."""
    operator = user_with_role("operator")
    client = Client()
    client.force_login(operator)
    return client, operator


@pytest.mark.integration
def test_good_file_is_imported_by_a_real_worker(import_client, celery_worker):
    client, operator = import_client
    DeviceModelFactory(name="Thermo-1")
    DeviceGroupFactory(name="north")
    DeviceGroupFactory(name="roof")
    content = (
        "\ufeffclient_id,name,model,groups,mac\n"
        "device-imp-1,Boiler,Thermo-1,north;roof,00-1A-2B-3C-4D-5E\n"
        "device-imp-2,Roof,,north,\n"
    ).encode()
    response = upload(client, content)
    assert response.status_code == 302
    job = ImportJob.objects.get()
    assert response["Location"] == reverse("import-detail", args=[job.pk])

    page = wait_for_job_page(client, response["Location"], celery_worker)
    assert "2 devices imported." in page
    assert f'href="{reverse("device-list")}?ordering=-created"' in page
    device = Device.objects.get(client_id="device-imp-1")
    assert device.model.name == "Thermo-1" and device.mac == "00:1a:2b:3c:4d:5e"
    assert sorted(g.name for g in device.groups.all()) == ["north", "roof"]
    assert Device.objects.count() == 2
    submit = AuditEvent.objects.get(action="import.submit")
    assert submit.actor == operator and submit.source_address == "127.0.0.1" and submit.request_id
    assert AuditEvent.objects.filter(action="device.create").count() == 2

    listing = client.get(reverse("import-list")).content.decode()
    assert "devices.csv" in listing and "Imported" in listing


@pytest.mark.integration
def test_bad_file_shows_every_bad_row_and_imports_nothing(import_client, celery_worker):
    client, _ = import_client
    DeviceFactory(client_id="device-exists")
    content = (
        b"client_id,name,model,mac\n"
        b"device-fine,ok,,\n"
        b"sensor-9,wrong prefix,,\n"
        b"device-fine,twice,,\n"
        b"device-bad-mac,x,,zz:zz\n"
        b"device-exists,already there,,\n"
        b"device-model,x,NoSuchModel,\n"
    )
    response = upload(client, content)
    assert response.status_code == 302
    page = wait_for_job_page(client, response["Location"], celery_worker)
    assert "Nothing was imported." in page
    table = page.split('id="import-errors"', 1)[1]
    rows = re.findall(r'<tr><td class="num mono">(\d+)</td><td>(.*?)</td></tr>', table)
    reasons = {int(line): reason for line, reason in rows}
    assert set(reasons) == {3, 4, 5, 6, 7}
    assert "does not follow the fleet rule" in reasons[3]
    assert "appears twice in the file (also on line 2)" in reasons[4]
    assert "is not a MAC address" in reasons[5]
    assert "already in the inventory" in reasons[6]
    assert "unknown model &#x27;NoSuchModel&#x27;" in reasons[7]
    assert set(Device.objects.values_list("client_id", flat=True)) == {"device-exists"}


def test_non_utf8_empty_and_oversize_uploads_get_a_clear_message(operator_client, settings):
    response = upload(operator_client, "client_id,name\ndevice-1,Café\n".encode("latin-1"))
    assert response.status_code == 400
    assert "This file is not UTF-8 text." in response.content.decode()
    assert "CSV UTF-8" in response.content.decode()

    response = upload(operator_client, b"  \n")
    assert response.status_code == 400 and "The file is empty." in response.content.decode()

    response = upload(operator_client, b"\x00\x01\x02binary")
    assert response.status_code == 400 and "not a text file" in response.content.decode()

    settings.FLEET_IMPORT_MAX_BYTES = 20
    response = upload(operator_client, b"client_id\n" + b"device-x\n" * 10)
    assert response.status_code == 400
    assert "the limit is 20\xa0bytes" in response.content.decode()
    assert not ImportJob.objects.exists()


def test_upload_page_explains_the_columns(operator_client):
    page = operator_client.get(reverse("import-create")).content.decode()
    for column in ("client_id", "name", "model", "groups", "serial", "mac", "firmware_version"):
        assert f"<dt>{column}</dt>" in page
    assert "separated by <code>;</code>" in page
    assert 'enctype="multipart/form-data"' in page


def test_upload_strips_the_byte_order_mark_and_creates_a_job(operator_client, django_capture_on_commit_callbacks):
    response = upload(operator_client, "\ufeffclient_id\ndevice-bom\n".encode())
    job = ImportJob.objects.get()
    assert response["Location"] == reverse("import-detail", args=[job.pk])
    assert job.content == "client_id\ndevice-bom\n" and job.filename == "devices.csv"


def test_job_page_polls_only_while_the_job_runs(operator_client):
    running = ImportJob.objects.create(
        filename="big.csv", content="", state=ImportJob.State.VALIDATING, total_rows=200, processed_rows=50
    )
    page = operator_client.get(reverse("import-detail", args=[running.pk])).content.decode()
    assert 'hx-trigger="every 1s"' in page
    assert 'aria-valuenow="25"' in page and "width: 25%" in page and "50 of 200 rows checked" in page
    done = ImportJob.objects.create(filename="done.csv", content="", state=ImportJob.State.SUCCEEDED, imported_rows=7)
    page = operator_client.get(reverse("import-detail", args=[done.pk])).content.decode()
    assert "hx-trigger" not in page and "7 devices imported." in page
    assert operator_client.get(reverse("import-detail", args=[done.pk + 100])).status_code == 404
