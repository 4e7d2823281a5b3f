"""Bulk revoke and quarantine (issue 5): filters, preview, typed confirmation, progress; and 500 devices revoked
through a real worker and a real Mosquitto, every one refused."""

import pytest
from django.utils import timezone
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from bench.mqtt_raw import close_all, connect_many, count_closed
from devices.models import Device
from security import revocation, services
from security.enforcement.secrets import hash_secret
from security.models import AuditEvent, BulkAction, DeviceAction, DeviceCredential
from tests.factories import DeviceFactory, DeviceGroupFactory, DeviceModelFactory
from tests.support.waiting import wait_until


def api(user):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.get_or_create(user=user)[0].key}")
    return client


# --- validation, preview and confirmation (no servers) ------------------------------------------------------------


@pytest.fixture
def batch(db):
    model = DeviceModelFactory(name="Thermo-3")
    devices = [DeviceFactory(client_id=f"device-b{n:03d}", model=model, firmware_version="2.1.0") for n in range(6)]
    DeviceFactory(client_id="device-other", firmware_version="3.0.0")
    devices[5].status = Device.Status.REVOKED
    devices[5].save()
    return devices


@pytest.mark.django_db
def test_bulk_refuses_unknown_filters_and_invalid_values_instead_of_widening(batch, support):
    with pytest.raises(Exception, match="Unknown filter"):
        revocation.bulk_action_create(
            actor=support, action="revoke", filters={"modle": "Thermo-3"}, reason="x", confirm_count=7
        )
    with pytest.raises(Exception, match="model"):
        revocation.bulk_action_create(
            actor=support, action="revoke", filters={"model": "No-such-model"}, reason="x", confirm_count=7
        )
    assert not BulkAction.objects.exists()
    assert Device.objects.filter(status="revoked").count() == 1


@pytest.mark.django_db
def test_bulk_needs_the_exact_count_and_a_reason(batch, support):
    filters = {"model": "Thermo-3"}
    with pytest.raises(Exception) as excinfo:
        revocation.bulk_action_create(actor=support, action="revoke", filters=filters, reason="batch", confirm_count=6)
    assert "match 5 devices" in str(excinfo.value)  # the revoked one is not counted
    with pytest.raises(Exception, match="reason"):
        revocation.bulk_action_create(actor=support, action="revoke", filters=filters, reason="  ", confirm_count=5)
    bulk = revocation.bulk_action_create(
        actor=support, action="revoke", filters=filters, reason="batch recalled", confirm_count=5
    )
    assert bulk.total == 5 and len(bulk.device_ids) == 5
    event = AuditEvent.objects.get(action="bulk.revoke_requested")
    assert event.actor == support and event.after["devices"] == 5 and event.after["filters"] == filters


@pytest.mark.django_db
def test_bulk_chunks_change_devices_audit_each_and_write_one_outbox_row_per_chunk(batch, support):
    bulk = revocation.bulk_action_create(
        actor=support, action="quarantine", filters={"firmware": "2.1.0"}, reason="bad firmware", confirm_count=5
    )
    assert revocation.bulk_action_run_chunk(bulk_id=bulk.pk, chunk_size=2) is True
    bulk.refresh_from_db()
    assert (bulk.processed, bulk.changed, bulk.state) == (2, 2, "running")
    while revocation.bulk_action_run_chunk(bulk_id=bulk.pk, chunk_size=2):
        pass
    bulk.refresh_from_db()
    assert (bulk.processed, bulk.changed, bulk.state) == (5, 5, "succeeded")
    assert Device.objects.filter(status="quarantined").count() == 5
    from security.models import EnforcementChange

    assert EnforcementChange.objects.filter(kind="bulk.quarantine").count() == 3
    events = AuditEvent.objects.filter(action="device.quarantine")
    assert events.count() == 5 and all(e.actor == support and e.after["bulk_id"] == bulk.pk for e in events)
    assert DeviceAction.objects.filter(bulk=bulk, state="pending").count() == 5
    # Run again (a redelivered task): nothing changes twice.
    assert revocation.bulk_action_run_chunk(bulk_id=bulk.pk) is False
    assert AuditEvent.objects.filter(action="device.quarantine").count() == 5


@pytest.mark.django_db
def test_bulk_pages_preview_confirm_and_show_progress(batch, client, support):
    client.force_login(support)
    page = client.get("/bulk-actions/new/?action=revoke&model=Thermo-3")
    assert page.status_code == 200
    html = page.content.decode()
    assert 'data-eligible="5"' in html and "These filters match <strong>6</strong>" in html
    wrong = client.post(
        "/bulk-actions/new/", {"action": "revoke", "model": "Thermo-3", "reason": "recall", "confirm_count": "6"}
    )
    assert wrong.status_code == 400 and "type 5 to confirm" in wrong.content.decode()
    assert not BulkAction.objects.exists()
    done = client.post(
        "/bulk-actions/new/", {"action": "revoke", "model": "Thermo-3", "reason": "recall", "confirm_count": "5"}
    )
    bulk = BulkAction.objects.get()
    assert done.status_code == 302 and done["Location"] == f"/bulk-actions/{bulk.pk}/"
    progress = client.get(done["Location"])
    assert progress.status_code == 200 and 'hx-trigger="every 1s"' in progress.content.decode()
    fragment = client.get(done["Location"], HTTP_HX_REQUEST="true").content.decode()
    assert fragment.lstrip().startswith('<div id="bulk-status"')
    # The device list offers the action with the current filters.
    listing = client.get("/devices/?model=Thermo-3").content.decode()
    assert "/bulk-actions/new/?action=revoke&amp;model=Thermo-3" in listing


@pytest.mark.django_db
def test_bulk_permissions(batch, client, auditor, operator, support):
    for user, status in ((auditor, 403), (operator, 403), (support, 200)):
        client.force_login(user)
        assert client.get("/bulk-actions/new/?action=quarantine&model=Thermo-3").status_code == status
    response = api(auditor).post(
        "/api/v1/devices/bulk/revoke/",
        {"filters": {"model": "Thermo-3"}, "reason": "x", "confirm_count": 5},
        format="json",
    )
    assert response.status_code == 403 and not BulkAction.objects.exists()
    response = api(support).post(
        "/api/v1/devices/bulk/revoke/",
        {"filters": {"model": "Thermo-3"}, "reason": "x", "confirm_count": 1},
        format="json",
    )
    assert response.status_code == 400 and "type 5" in response.json()["confirm_count"][0]


# --- 500 devices, real worker, real broker ---------------------------------------------------------------------------


@pytest.fixture
def roles_present(transactional_db):
    from django.apps import apps

    from security.roles import roles_sync

    roles_sync(apps)


def _secret(n):
    return f"bulk-secret-{n:04d}-0123456789abcdefghijklmnopqrstuv"


@pytest.mark.integration
@pytest.mark.slow
def test_bulk_revoke_of_500_devices_refuses_every_one_in_a_handful_of_reloads(
    roles_present, celery_worker, mosquitto, support
):
    group = DeviceGroupFactory(name="batch-7")
    Device.objects.bulk_create([Device(client_id=f"device-k{n:04d}") for n in range(505)])
    devices = {d.client_id: d for d in Device.objects.filter(client_id__startswith="device-k")}
    now = timezone.now()
    DeviceCredential.objects.bulk_create(
        [
            DeviceCredential(
                device=devices[f"device-k{n:04d}"], password_hash=hash_secret(_secret(n), iterations=1), issued_at=now
            )
            for n in range(505)
        ]
    )
    group.devices.add(*[devices[f"device-k{n:04d}"] for n in range(500)])  # 500 in the batch, 5 outside
    services.enforcement_apply(coalesce=False)
    # Every device of the batch connected (one thread, raw MQTT), plus the five outside it.
    batch_creds = [(f"device-k{n:04d}", _secret(n)) for n in range(500)]
    others = [(f"device-k{n:04d}", _secret(n)) for n in range(500, 505)]
    connected = connect_many(mosquitto.port, batch_creds)
    outside = connect_many(mosquitto.port, others)
    try:
        assert connected.ok == 500 and outside.ok == 5
        reloads_before = mosquitto.log().count("Reloading config")
        response = api(support).post(
            "/api/v1/devices/bulk/revoke/",
            {"filters": {"group": "batch-7"}, "reason": "batch 7 keys leaked", "confirm_count": 500},
            format="json",
        )
        assert response.status_code == 202, response.content
        url = response.json()["url"]

        def settled():
            job = api(support).get(url).json()
            return job["state"] == "succeeded" and job["verification"]["verified"] == 500

        assert wait_until(settled, timeout=120), (api(support).get(url).json(), celery_worker.log()[-3000:])
        # Every connection of the batch was dropped, none of the others.
        assert wait_until(lambda: count_closed(connected.sockets) == 500, timeout=5)
        assert count_closed(outside.sockets) == 0
        # Every one refused: the verifier tried a CONNECT as each of them...
        actions = DeviceAction.objects.filter(bulk_id=response.json()["id"])
        assert actions.count() == 500
        assert all(a.evidence["connect_attempt"]["refused"] and not a.evidence["in_password_file"] for a in actions)
        # The broker's own word on the sessions: it logged each of the 500 as dropped (a watcher too slow to subscribe
        # before a reload says "not observed"; it must never claim "not connected" for a device that was).
        from collections import Counter

        sessions = Counter(a.evidence["session"]["state"] for a in actions)
        assert sessions["dropped"] >= 490 and not sessions["not_connected"], sessions
        from django.test import Client

        page = Client()
        page.force_login(support)
        html = page.get(f"/bulk-actions/{response.json()['id']}/").content.decode()
        assert f"<strong>{sessions['dropped']}</strong> dropped" in html
        # ...and so do we, with the real secrets.
        again = connect_many(mosquitto.port, batch_creds, retry_refused_connect=False)
        assert again.ok == 0 and again.refused == 500
        # Coalesced: one outbox row per chunk of 100, a handful of reloads, not 500.
        reloads = mosquitto.log().count("Reloading config") - reloads_before
        assert 1 <= reloads <= 10, reloads
        assert AuditEvent.objects.filter(action="device.revoke", after__bulk_id=response.json()["id"]).count() == 500
        assert AuditEvent.objects.filter(action="device.revoke_verified").count() == 500
        assert AuditEvent.objects.filter(action="bulk.revoke_completed").count() == 1
    finally:
        close_all(connected.sockets)
        close_all(outside.sockets)
