"""Rotation pages and API (issue 7): who may do what, what the pages say, the typed confirmation of a bulk rotation,
the API's answers, and a fixed number of queries on the list pages whatever their size."""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from django_celery_beat.models import PeriodicTask
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from security import services
from security.models import AuditEvent, CredentialRotation, RotationPolicy
from security.rotation import policies
from security.rotation import services as rotation
from tests.factories import DeviceFactory, DeviceGroupFactory

pytestmark = pytest.mark.django_db


def api(user):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.get_or_create(user=user)[0].key}")
    return client


def with_secret(operator, client_id, **kwargs):
    device = DeviceFactory(client_id=client_id, **kwargs)
    services.credential_issue(actor=operator, device=device)
    return device


# --- one device ---------------------------------------------------------------------------------------------


def test_rotate_from_the_device_page_needs_a_confirmation_and_shows_up_in_the_history(client, operator):
    with_secret(operator, "device-rv1")
    client.force_login(operator)
    page = client.get("/devices/device-rv1/").content.decode()
    assert 'hx-get="/devices/device-rv1/rotations/"' in page
    fragment = client.get("/devices/device-rv1/rotations/").content.decode()
    assert 'id="rotate-link"' in fragment and "never been rotated" in fragment
    assert "Rotate the credentials" in client.get("/devices/device-rv1/rotate/").content.decode()
    refused = client.post("/devices/device-rv1/rotate/", {})
    assert refused.status_code == 400 and not CredentialRotation.objects.exists()
    response = client.post("/devices/device-rv1/rotate/", {"confirm": "on"})
    assert response.status_code == 302 and response["Location"] == "/devices/device-rv1/"
    row = CredentialRotation.objects.get(client_id="device-rv1")
    fragment = client.get("/devices/device-rv1/rotations/").content.decode()
    assert f"Cancel rotation #{row.pk}" in fragment and "Pending delivery" in fragment and "every 5s" in fragment
    # A second one is refused with the reason; cancelling closes it and keeps the old secret.
    again = client.post("/devices/device-rv1/rotate/", {"confirm": "on"})
    assert again.status_code == 409 and "already has a rotation in progress" in again.content.decode()
    assert client.post(f"/rotations/{row.pk}/cancel/").status_code == 302
    assert CredentialRotation.objects.get(pk=row.pk).state == "cancelled"
    assert AuditEvent.objects.filter(action="rotation.cancel", actor=operator).exists()


def test_roles_on_the_rotation_pages(client, operator, support, auditor):
    device = with_secret(operator, "device-rv2")
    row = rotation.rotation_start(actor=operator, device=device)
    policy = policies.rotation_defaults_ensure()
    pages = {
        "/devices/device-rv2/rotate/": {"operator"},
        "/devices/device-rv2/rotations/": {"operator", "support", "auditor"},
        "/rotations/": {"operator", "support", "auditor"},
        "/rotations/card/": {"operator", "support", "auditor"},
        "/rotations/bulk/?search=device-rv2": {"operator"},
        "/rotations/policies/": {"operator", "auditor"},
        "/rotations/policies/new/": {"operator"},
        f"/rotations/policies/{policy.pk}/": {"operator"},
    }
    for user, name in ((operator, "operator"), (support, "support"), (auditor, "auditor")):
        client.force_login(user)
        for url, allowed in pages.items():
            assert client.get(url).status_code == (200 if name in allowed else 403), (url, name)
        if name != "operator":
            assert client.post("/devices/device-rv2/rotate/", {"confirm": "on"}).status_code == 403
            assert client.post(f"/rotations/{row.pk}/cancel/").status_code == 403
            assert client.post(f"/rotations/policies/{policy.pk}/run/").status_code == 403
            assert client.post(f"/rotations/policies/{policy.pk}/delete/").status_code == 403
    client.force_login(support)
    fragment = client.get("/devices/device-rv2/rotations/").content.decode()
    assert "rotate-link" not in fragment and "rotation-cancel" not in fragment and "Pending delivery" in fragment
    client.logout()
    assert client.get("/rotations/").status_code == 302


def test_the_overview_card_counts_confirmed_pending_overdue_and_failed(client, operator):
    now = timezone.now()
    for i, (state, deadline) in enumerate(
        [("completed", None), ("completed", None), ("delivered", now - timezone.timedelta(hours=1)), ("pending", None)]
        + [("failed", None)]
    ):
        device = DeviceFactory(client_id=f"device-ov{i}")
        CredentialRotation.objects.create(
            device=device,
            client_id=device.client_id,
            state=state,
            command_id=f"c{i}",
            deadline=deadline or now + timezone.timedelta(hours=1),
            completed_at=now if state == "completed" else None,
            failed_at=now if state == "failed" else None,
        )
    client.force_login(operator)
    assert 'hx-get="/rotations/card/"' in client.get("/").content.decode()
    card = client.get("/rotations/card/").content.decode()
    for name, value in (("confirmed", 2), ("pending", 2), ("overdue", 1), ("failed", 1)):
        assert f'data-count="{name}">{value}<' in card, (name, card)


# --- a filtered set ----------------------------------------------------------------------------------------------


def test_bulk_rotation_previews_the_count_and_needs_it_typed(client, operator):
    group = DeviceGroupFactory(name="lab")
    for i in range(3):
        with_secret(operator, f"device-rb{i}").groups.add(group)
    DeviceFactory(client_id="device-rb-bare").groups.add(group)  # nothing to rotate
    busy = with_secret(operator, "device-rb-busy")
    busy.groups.add(group)
    rotation.rotation_start(actor=operator, device=busy)
    with_secret(operator, "device-rb-other")
    client.force_login(operator)
    page = client.get("/rotations/bulk/?group=lab").content.decode()
    assert 'data-eligible="3"' in page and "match <strong>5</strong> devices" in page
    wrong = client.post("/rotations/bulk/", {"group": "lab", "confirm_count": "5"})
    assert (
        wrong.status_code == 400 and "match 3 devices that can rotate now; type 3 to confirm" in wrong.content.decode()
    )
    assert CredentialRotation.objects.count() == 1
    bad_filter = client.get("/rotations/bulk/?colour=blue")
    assert bad_filter.status_code == 400
    done = client.post("/rotations/bulk/", {"group": "lab", "confirm_count": "3"})
    assert done.status_code == 302 and done["Location"] == "/rotations/?open=true"
    assert set(
        CredentialRotation.objects.filter(trigger="manual", state="pending").values_list("client_id", flat=True)
    ) == {
        "device-rb0",
        "device-rb1",
        "device-rb2",
        "device-rb-busy",
    }
    assert AuditEvent.objects.filter(action="rotation.start", actor=operator).count() == 4


# --- policies -----------------------------------------------------------------------------------------------------


def test_operators_create_and_reschedule_policies_in_the_ui(client, operator):
    group = DeviceGroupFactory(name="gateways")
    client.force_login(operator)
    listing = client.get("/rotations/policies/").content.decode()
    assert "Fleet default" in listing and "every hour" in listing  # created on first visit
    form = {
        "name": "gateways",
        "scope": "group",
        "group": group.pk,
        "max_age_days": 30,
        "grace_hours": 24,
        "batch_size": 100,
        "switches_per_minute": 600,
        "on_unconfirmed": "revoke",
        "enabled": "on",
        "schedule_kind": "crontab",
        "crontab": "0 4 * * *",
    }
    bad = client.post("/rotations/policies/new/", {**form, "crontab": "0 4 *"})
    assert bad.status_code == 400 and "Write five fields" in bad.content.decode()
    assert client.post("/rotations/policies/new/", form).status_code == 302
    policy = RotationPolicy.objects.get(name="gateways")
    task = PeriodicTask.objects.get(pk=policy.periodic_task_id)
    assert task.crontab.hour == "4" and task.enabled
    edit = {**form, "schedule_kind": "interval", "every": 6, "period": "hours", "enabled": ""}
    assert client.post(f"/rotations/policies/{policy.pk}/", edit).status_code == 302
    task.refresh_from_db()
    assert task.interval.every == 6 and task.interval.period == "hours" and not task.enabled
    table = client.get("/rotations/policies/").content.decode().split('id="policy-table"', 1)[1]
    assert "every 6 hours" in table and "cron" not in table and "disabled" in table
    assert client.post(f"/rotations/policies/{policy.pk}/delete/").status_code == 302
    assert not RotationPolicy.objects.filter(pk=policy.pk).exists()
    assert {"rotation_policy.create", "rotation_policy.update", "rotation_policy.delete"} <= set(
        AuditEvent.objects.filter(actor=operator).values_list("action", flat=True)
    )


# --- API ---------------------------------------------------------------------------------------------------------


def test_api_rotate_answers_202_then_409_and_400_with_a_message(operator, support):
    with_secret(operator, "device-ra1")
    DeviceFactory(client_id="device-ra-bare")
    response = api(operator).post("/api/v1/devices/device-ra1/rotate/", HTTP_X_REQUEST_ID="rot-req-1")
    assert response.status_code == 202, response.content
    body = response.json()
    assert body["state"] == "pending" and body["kind"] == "secret" and body["client_id"] == "device-ra1"
    assert response["Location"] == body["url"] == f"/api/v1/rotations/{body['id']}/"
    event = AuditEvent.objects.get(action="rotation.start", object_id="device-ra1")
    assert event.request_id == "rot-req-1" and event.actor == operator
    again = api(operator).post("/api/v1/devices/device-ra1/rotate/")
    assert again.status_code == 409 and "already has a rotation in progress" in again.json()["detail"]
    bare = api(operator).post("/api/v1/devices/device-ra-bare/rotate/")
    assert bare.status_code == 400 and "Issue a credential first" in bare.json()["detail"]
    assert api(operator).post("/api/v1/devices/device-nope/rotate/").status_code == 404
    assert api(support).post("/api/v1/devices/device-ra1/rotate/").status_code == 403
    detail = api(support).get(body["url"]).json()
    assert detail["history"][0]["step"] == "start" and detail["requested_by"] == operator.username


def test_api_lists_rotations_with_filters(operator, auditor):
    for i in range(3):
        rotation.rotation_start(actor=operator, device=with_secret(operator, f"device-rl{i}"))
    CredentialRotation.objects.filter(client_id="device-rl0").update(state="failed")
    client = api(auditor)
    assert client.get("/api/v1/rotations/").json()["count"] == 3
    assert [r["client_id"] for r in client.get("/api/v1/rotations/?state=failed").json()["results"]] == ["device-rl0"]
    assert client.get("/api/v1/rotations/?client_id=device-rl1").json()["count"] == 1
    assert client.get("/api/v1/rotations/?open=true").json()["count"] == 2
    assert client.get("/api/v1/rotations/?state=bogus").status_code == 400


# --- query counts ------------------------------------------------------------------------------------------------


def grow(count, operator):
    now = timezone.now()
    policy = policies.rotation_defaults_ensure()
    existing = CredentialRotation.objects.count()
    for i in range(existing, count):
        device = DeviceFactory(client_id=f"device-rq{i:04d}")
        CredentialRotation.objects.create(
            device=device,
            client_id=device.client_id,
            state=["pending", "delivered", "completed", "failed"][i % 4],
            command_id=f"q{i}",
            policy=policy,
            deadline=now,
            history=[{"at": now.isoformat(), "step": "start", "outcome": "ok"}],
        )


@pytest.mark.parametrize("url", ["/rotations/", "/rotations/card/", "/rotations/policies/", "/api/v1/rotations/"])
def test_query_count_does_not_grow_with_the_number_of_rotations(url, client, operator):
    client.force_login(operator)
    counts = []
    for size in (10, 200):
        grow(size, operator)
        with CaptureQueriesContext(connection) as captured:
            assert client.get(url).status_code == 200
        counts.append(len(captured.captured_queries))
    assert counts[0] == counts[1], counts


def test_run_now_starts_the_policys_due_devices_as_the_person_who_clicked(client, operator):
    from datetime import timedelta

    from security.models import DeviceCredential

    policy = policies.rotation_defaults_ensure()
    old = with_secret(operator, "device-rn-old")
    with_secret(operator, "device-rn-new")
    DeviceCredential.objects.filter(device=old).update(issued_at=timezone.now() - timedelta(days=365))
    client.force_login(operator)
    response = client.post(f"/rotations/policies/{policy.pk}/run/")
    assert response.status_code == 302
    row = CredentialRotation.objects.get()
    assert row.client_id == "device-rn-old" and row.requested_by == operator and row.policy == policy
