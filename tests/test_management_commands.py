"""The commands `make run` calls on every start: bootstrap_admin and seed_demo."""

import re
from datetime import timedelta
from io import StringIO

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.utils import timezone

from devices.models import Device, DeviceGroup, DeviceModel
from security.models import AuditEvent

PASSWORD_LINE = re.compile(r"^\s*password: (\S+)\s*$", re.MULTILINE)


def run(command: str, *args: str) -> str:
    out = StringIO()
    call_command(command, *args, stdout=out)
    return out.getvalue()


@pytest.mark.django_db
def test_bootstrap_admin_prints_a_password_once_and_it_logs_in(client):
    output = run("bootstrap_admin")
    printed = PASSWORD_LINE.findall(output)
    assert len(printed) == 1, output
    password = printed[0]
    assert len(password) >= 20

    admin = get_user_model().objects.get(username="admin")
    assert admin.is_superuser and admin.is_staff
    assert list(admin.groups.values_list("name", flat=True)) == ["admin"]
    assert password not in admin.password, "only the hash may be stored"
    assert client.login(username="admin", password=password)
    assert AuditEvent.objects.filter(action="user.create", object_id="admin").count() == 1

    # The login page accepts it too, as a person would use it.
    client.logout()
    response = client.post("/accounts/login/", {"username": "admin", "password": password})
    assert response.status_code == 302
    assert "_auth_user_id" in client.session


@pytest.mark.django_db
def test_bootstrap_admin_second_run_changes_nothing(client):
    password = PASSWORD_LINE.findall(run("bootstrap_admin"))[0]
    stored_hash = get_user_model().objects.get(username="admin").password

    output = run("bootstrap_admin")
    assert not PASSWORD_LINE.findall(output), "a second run must not print (or invent) a password"
    assert "already exists" in output
    assert "changepassword admin" in output
    assert get_user_model().objects.get(username="admin").password == stored_hash
    assert get_user_model().objects.filter(username="admin").count() == 1
    assert client.login(username="admin", password=password)


@pytest.mark.django_db
def test_seed_demo_creates_a_varied_fleet_through_the_services():
    output = run("seed_demo")
    assert "created 3 models, 4 groups and 50 devices" in output

    assert DeviceModel.objects.count() == 3
    assert all(m.latest_firmware and m.minimum_firmware for m in DeviceModel.objects.all())
    assert DeviceGroup.objects.count() == 4
    devices = Device.objects.all()
    assert devices.count() == 50
    assert all(d.client_id.startswith("device-demo-") for d in devices)
    assert all(d.mac and d.serial for d in devices)
    assert len({d.mac for d in devices}) == 50
    assert len({d.firmware_version for d in devices}) >= 6
    assert devices.filter(groups__isnull=True).exists() and devices.filter(groups__isnull=False).exists()

    now = timezone.now()
    assert devices.filter(last_seen__gte=now - timedelta(minutes=15)).exists(), "some devices seen recently"
    assert devices.filter(last_seen__lt=now - timedelta(hours=1)).exists(), "some seen long ago"
    assert devices.filter(last_seen__isnull=True).exists(), "some never seen"

    # Written through the services: every record is in the audit log, attributed to the command.
    creates = AuditEvent.objects.filter(action="device.create")
    assert creates.count() == 50
    assert set(creates.values_list("actor_label", flat=True)) == {"service:seed_demo"}
    assert AuditEvent.objects.filter(action="devicemodel.create").count() == 3
    assert AuditEvent.objects.filter(action="devicegroup.create").count() == 4


@pytest.mark.django_db
def test_seed_demo_is_idempotent():
    run("seed_demo")
    snapshot = sorted(Device.objects.values_list("client_id", "firmware_version", "mac", "model__name"))
    events = AuditEvent.objects.count()

    output = run("seed_demo")
    assert "nothing to add" in output
    assert sorted(Device.objects.values_list("client_id", "firmware_version", "mac", "model__name")) == snapshot
    assert DeviceModel.objects.count() == 3 and DeviceGroup.objects.count() == 4
    assert AuditEvent.objects.count() == events


@pytest.mark.django_db
def test_seed_demo_fills_in_what_is_missing():
    run("seed_demo", "--devices", "10")
    Device.objects.filter(client_id="device-demo-004").delete()
    output = run("seed_demo", "--devices", "10")
    assert "created 0 models, 0 groups and 1 devices" in output
    assert Device.objects.count() == 10


def test_seed_demo_help_explains_it():
    from django.core.management import get_commands, load_command_class

    command = load_command_class(get_commands()["seed_demo"], "seed_demo")
    help_text = command.create_parser("manage.py", "seed_demo").format_help()
    assert "demo fleet" in help_text and "Safe to run again" in help_text
