"""The policy page, GET /api/v1/policy/, "Sync now" and the overview's broker card: who sees what, and that they
tell the truth about the broker (real Mosquitto where the state matters)."""

import pytest
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from security import services
from security.models import AuditEvent, DeviceCredential
from tests.factories import DeviceFactory

pytestmark = pytest.mark.django_db


def api(user):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.get_or_create(user=user)[0].key}")
    return client


@pytest.mark.parametrize(
    "role, status", [("admin", 200), ("operator", 200), ("support", 200), ("auditor", 200), (None, 403)]
)
def test_policy_page_and_api_by_role(client, user_with_role, role, status):
    user = user_with_role(role, username=f"u-{role}")
    client.force_login(user)
    assert client.get("/policy/").status_code == status
    assert api(user).get("/api/v1/policy/").status_code == status


@pytest.mark.parametrize("role, status", [("admin", 202), ("operator", 202), ("support", 403), ("auditor", 403)])
def test_sync_by_role(client, user_with_role, role, status):
    user = user_with_role(role, username=f"s-{role}")
    assert api(user).post("/api/v1/policy/sync/").status_code == status
    client.force_login(user)
    page = client.post("/policy/sync/")
    assert page.status_code == (302 if status == 202 else 403)
    assert AuditEvent.objects.filter(action="broker.sync_requested").count() == (2 if status == 202 else 0)


def test_anonymous_is_sent_to_login_or_refused(client):
    assert client.get("/policy/").status_code == 302
    assert APIClient().get("/api/v1/policy/").status_code == 401


def test_policy_shows_the_rendered_files_without_hashes_and_what_a_device_may_do(client, operator, support):
    device = DeviceFactory(client_id="device-pol1")
    services.credential_issue(actor=operator, device=device)
    quarantined = DeviceFactory(client_id="device-pol2")
    services.credential_issue(actor=operator, device=quarantined)
    services.device_quarantine(actor=support, device=quarantined, reason="test")
    stored = DeviceCredential.objects.get(device=device).password_hash

    body = api(operator).get("/api/v1/policy/", {"client_id": "device-pol2"}).json()
    assert "pattern write tx/%u/telemetry" in body["acl"]
    assert "user device-pol2" in body["acl"]
    assert {"device-pol1", "device-pol2", "fleetkeeper-consumer"} <= set(body["password_file_usernames"])
    assert body["quarantined"] == ["device-pol2"]
    assert body["device"]["publish"] == ["tx/device-pol2/ack"]
    assert body["device"]["subscribe"] == ["rx/device-pol2/credentials", "rx/device-pol2/firmware"]
    assert body["outbox"]["pending"] == 3 and body["status"] == "3 changes pending"
    assert stored not in str(body) and stored.split("$")[-1] not in str(body)

    client.force_login(support)
    html = client.get("/policy/", {"client_id": "device-pol1"}).content.decode()
    assert "tx/device-pol1/telemetry" in html and "rx/device-pol1/command" in html
    assert stored.split("$")[-1] not in html and stored.split("$")[-2] not in html
    assert "3 changes pending" in html and "Sync now" not in html  # support may look, not sync


@pytest.mark.integration
def test_policy_reports_in_sync_then_drift_against_the_real_broker(client, mosquitto, operator):
    device = DeviceFactory(client_id="device-pol3")
    services.credential_issue(actor=operator, device=device)
    services.enforcement_apply(coalesce=False)
    body = api(operator).get("/api/v1/policy/").json()
    assert body["status"] == "in sync" and body["diff"] == {}
    assert body["broker"]["reachable"] and body["broker"]["last_probe_ok"]
    # Someone edits the broker's password file by hand.
    passwd = mosquitto.dir / "passwd"
    passwd.write_text(passwd.read_text() + "stranger:" + DeviceCredential.objects.get().password_hash + "\n")
    body = api(operator).get("/api/v1/policy/").json()
    assert body["diff"]["passwd"] == {"unknown": ["stranger"]}
    client.force_login(operator)
    html = client.get("/policy/").content.decode()
    assert "stranger" in html and "Sync now" in html


def test_overview_card_shows_broker_state_in_constant_queries(client, operator, django_assert_max_num_queries):
    client.force_login(operator)
    for n in range(3):
        services.credential_issue(actor=operator, device=DeviceFactory(client_id=f"device-card{n}"))
    from django.template import Context, Template

    template = Template('{% include "security/_broker_status.html" %}')
    with django_assert_max_num_queries(2):
        html = template.render(Context({"perms": {}}))
    assert "3 changes pending" in html and "Broker" in html
    page = client.get("/").content.decode()
    assert "3 changes pending" in page
