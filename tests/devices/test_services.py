import pytest
from django.core.exceptions import ValidationError

from devices import services
from devices.models import Device, ImportJob
from security.models import AuditEvent
from tests.factories import DeviceFactory, DeviceGroupFactory, DeviceModelFactory

pytestmark = pytest.mark.django_db


def test_device_create_validates_normalises_and_audits(operator):
    model = DeviceModelFactory(name="TH-1")
    group = DeviceGroupFactory(name="plant-a")
    device = services.device_create(
        actor=operator, client_id="device-th1-0001", model=model, groups=[group], mac="00-1A-2B-3C-4D-5E"
    )
    assert device.mac == "00:1a:2b:3c:4d:5e"
    assert device.status == Device.Status.ACTIVE
    event = AuditEvent.objects.get(action="device.create")
    assert event.actor == operator
    assert event.object_id == "device-th1-0001"
    assert event.after["groups"] == ["plant-a"]
    assert event.after["model"] == "TH-1"


def test_device_create_refuses_bad_prefix_and_duplicates(operator):
    with pytest.raises(ValidationError) as bad:
        services.device_create(actor=operator, client_id="sensor-1")
    assert "client_id" in bad.value.message_dict
    services.device_create(actor=operator, client_id="device-1")
    with pytest.raises(ValidationError) as dup:
        services.device_create(actor=operator, client_id="device-1")
    assert "already exists" in dup.value.message_dict["client_id"][0]
    assert Device.objects.count() == 1
    assert AuditEvent.objects.filter(action="device.create").count() == 1


def test_device_update_records_before_and_after_and_refuses_status(operator):
    device = DeviceFactory(client_id="device-x", name="old")
    services.device_update(actor=operator, device=device, data={"name": "new"})
    event = AuditEvent.objects.get(action="device.update")
    assert event.before["name"] == "old" and event.after["name"] == "new"
    assert event.changed_fields == ["name"]
    with pytest.raises(ValidationError, match="cannot be changed here"):
        services.device_update(actor=operator, device=device, data={"status": "revoked"})
    device.refresh_from_db()
    assert device.status == Device.Status.ACTIVE


def test_audit_log_is_append_only(operator):
    services.device_create(actor=operator, client_id="device-1")
    event = AuditEvent.objects.get()
    event.action = "forged"
    with pytest.raises(TypeError):
        event.save()
    with pytest.raises(TypeError):
        event.delete()
    with pytest.raises(TypeError):
        AuditEvent.objects.all().delete()
    with pytest.raises(TypeError):
        AuditEvent.objects.update(action="forged")
    assert AuditEvent.objects.get().action == "device.create"


GOOD_CSV = """client_id,name,model,groups,serial,mac,firmware_version
device-a1,Boiler 1,TH-1,plant-a;plant-b,SN1,00:1a:2b:3c:4d:01,1.2.0
device-a2,Boiler 2,TH-1,,SN2,,1.2.0
device-a3,,,,,,
"""


def _run_import(operator, content):
    job = ImportJob.objects.create(filename="fleet.csv", content=content, created_by=operator)
    return services.import_job_run(job_id=job.pk)


def test_csv_import_good_file_imports_every_row_with_groups_and_audit(operator):
    DeviceModelFactory(name="TH-1")
    DeviceGroupFactory(name="plant-a")
    DeviceGroupFactory(name="plant-b")
    job = _run_import(operator, GOOD_CSV)
    assert job.state == ImportJob.State.SUCCEEDED, job.errors
    assert job.imported_rows == 3
    a1 = Device.objects.get(client_id="device-a1")
    assert sorted(g.name for g in a1.groups.all()) == ["plant-a", "plant-b"]
    assert a1.model.name == "TH-1"
    assert AuditEvent.objects.filter(action="device.create").count() == 3
    assert AuditEvent.objects.filter(action="import.apply", actor=operator).count() == 1


def test_csv_import_with_bad_rows_imports_nothing_and_names_each_line(operator):
    DeviceModelFactory(name="TH-1")
    DeviceFactory(client_id="device-exists")
    content = (
        "client_id,name,model,mac\n"
        "device-ok,fine,TH-1,\n"  # line 2: good
        "sensor-9,bad prefix,,\n"  # line 3
        "device-ok,duplicate in file,,\n"  # line 4
        "device-m,bad mac,,zz:zz\n"  # line 5
        "device-n,unknown model,NOPE,\n"  # line 6
        "device-exists,already there,,\n"  # line 7
    )
    job = _run_import(operator, content)
    assert job.state == ImportJob.State.FAILED
    lines = {e["line"]: e["reason"] for e in job.errors}
    assert set(lines) == {3, 4, 5, 6, 7}
    assert "fleet rule" in lines[3]
    assert "twice" in lines[4] and "line 2" in lines[4]
    assert "MAC" in lines[5]
    assert "unknown model" in lines[6]
    assert "already in the inventory" in lines[7]
    assert not Device.objects.filter(client_id="device-ok").exists()
    assert Device.objects.count() == 1


def test_csv_import_rejects_unknown_columns_and_missing_header(operator):
    job = _run_import(operator, "client,name\ndevice-1,x\n")
    assert job.state == ImportJob.State.FAILED and "client_id" in job.errors[0]["reason"]
    job = _run_import(operator, "client_id,colour\ndevice-1,red\n")
    assert job.state == ImportJob.State.FAILED and "colour" in job.errors[0]["reason"]
    job = _run_import(operator, "client_id\n")
    assert job.state == ImportJob.State.FAILED and "no devices" in job.errors[0]["reason"]


def test_finished_import_is_not_run_twice(operator):
    job = _run_import(operator, "client_id\ndevice-once\n")
    assert job.state == ImportJob.State.SUCCEEDED
    again = services.import_job_run(job_id=job.pk)
    assert again.state == ImportJob.State.SUCCEEDED
    assert Device.objects.filter(client_id="device-once").count() == 1


def test_export_round_trips_and_neutralises_formulas(operator):
    DeviceFactory(client_id="device-e1", name="=HYPERLINK(evil)")
    rows = list(services.device_export_rows(Device.objects.all()))
    assert rows[0][:7] == services.CSV_COLUMNS
    assert rows[1][0] == "device-e1"
    assert rows[1][1] == "'=HYPERLINK(evil)"
