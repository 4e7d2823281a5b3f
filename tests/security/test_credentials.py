"""Device secrets: generated, shown once, stored only as Mosquitto's hash; operator-supplied ones checked."""

import base64
import re

import pytest
from django.core.exceptions import PermissionDenied, ValidationError
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from devices.models import Device
from devices.services import device_create
from security import services
from security.enforcement.secrets import parse_hash, verify_secret
from security.models import AuditEvent, DeviceCredential, EnforcementChange
from tests.factories import DeviceFactory
from tests.support.broker import raw_connect_code

pytestmark = pytest.mark.django_db


def api_client(user):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.get_or_create(user=user)[0].key}")
    return client


def test_issue_generates_a_256_bit_secret_stored_only_as_a_mosquitto_hash(operator, settings):
    device = DeviceFactory()
    issued = services.credential_issue(actor=operator, device=device)
    raw = base64.urlsafe_b64decode(issued.password + "=" * (-len(issued.password) % 4))
    assert len(raw) == 32
    credential = DeviceCredential.objects.get(device=device)
    iterations, salt, digest = parse_hash(credential.password_hash)
    assert (iterations, len(salt), len(digest)) == (settings.MQTT_PASSWORD_ITERATIONS, 12, 64)
    assert verify_secret(issued.password, credential.password_hash)
    assert issued.password not in credential.password_hash
    # The plaintext is nowhere in the database: not in the audit log, not in the outbox.
    event = AuditEvent.objects.get(action="credential.issue", object_id=device.client_id)
    assert issued.password not in str(event.after) and issued.password not in str(event.before)
    change = EnforcementChange.objects.get(client_id=device.client_id)
    assert change.state == EnforcementChange.State.PENDING and change.kind == "credential.issue"


def test_two_issues_give_different_secrets_and_the_second_replaces_the_first(operator):
    device = DeviceFactory()
    first = services.credential_issue(actor=operator, device=device)
    second = services.credential_issue(actor=operator, device=device)
    assert first.password != second.password and second.replaced
    stored = DeviceCredential.objects.get(device=device).password_hash
    assert verify_secret(second.password, stored) and not verify_secret(first.password, stored)
    assert AuditEvent.objects.filter(action="credential.reissue", object_id=device.client_id).count() == 1


def test_issue_needs_the_issue_credentials_permission(support, auditor):
    device = DeviceFactory()
    for user in (support, auditor):
        with pytest.raises(PermissionDenied):
            services.credential_issue(actor=user, device=device)
    assert not DeviceCredential.objects.exists()


def test_revoked_device_gets_no_credential_until_reinstated(operator, support):
    device = DeviceFactory()
    services.credential_issue(actor=operator, device=device)
    services.device_revoke(actor=support, device=device, reason="stolen")
    assert not DeviceCredential.objects.filter(device=device).exists()
    with pytest.raises(ValidationError, match="reinstate it"):
        services.credential_issue(actor=operator, device=device)
    services.device_reinstate(actor=operator, device=device)
    services.credential_issue(actor=operator, device=device)
    assert DeviceCredential.objects.filter(device=device).exists()


@pytest.mark.parametrize(
    "secret, reason",
    [
        ("short-secret-1234", "at least"),
        ("device-abc123-" + "Q7x!pL2m" * 3, "client id"),
        ("Q7x!pL2m-SN-4711-2024-" + "k9" * 8, "serial"),
        ("Q7x!pL2mK9z" + "00:1a:2b:3c:4d:5e" + "R4t#wY8u", "MAC"),
        ("Q7x!pL2mK9z" + "001A2B3C4D5E" + "R4t#wY8uVb6", "MAC"),
        ("Q7x!pL2mK9z" + "00-1a-2b-3c-4d-5e" + "R4t#wY8u", "MAC"),
        ("Q7x!pL2mK9z" + "001a.2b3c.4d5e" + "R4t#wY8uVb6", "MAC"),
        ("a" * 40, "too few"),
        ("Q7x!pL2mK9z R4t#wY8uVb6Q7x!pL2mK9z", "spaces"),
    ],
)
def test_operator_supplied_secret_is_refused_when_weak_or_derived_from_the_device(operator, secret, reason):
    device = DeviceFactory(client_id="device-abc123", serial="SN-4711-2024", mac="00:1a:2b:3c:4d:5e")
    with pytest.raises(ValidationError) as excinfo:
        services.credential_issue(actor=operator, device=device, secret=secret)
    assert reason in " ".join(excinfo.value.messages)
    assert not DeviceCredential.objects.exists()


def test_client_id_outside_the_prefix_rule_is_refused(operator):
    """The device API is the API work's; the rule lives in the model validator every path goes through."""
    for bad in ("sensor-1", "device-", "device-a/b", "device-#", "device-+", "$SYS", "#"):
        with pytest.raises(ValidationError):
            device_create(actor=operator, client_id=bad)
    assert not Device.objects.exists()


def test_api_refuses_a_client_id_outside_the_prefix_with_400(operator):
    response = api_client(operator).post("/api/v1/devices/", {"client_id": "evil-1"}, format="json")
    assert response.status_code == 400, response.content
    assert "client_id" in response.json()


def test_api_issues_a_secret_once_with_connection_details(operator, settings):
    device = DeviceFactory(client_id="device-api1")
    response = api_client(operator).post(f"/api/v1/devices/{device.client_id}/credentials/", format="json")
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["client_id"] == body["username"] == "device-api1"
    assert body["broker"] == {
        "host": settings.MQTT_PUBLIC_HOST,
        "port": settings.MQTT_PORT,
        "tls_port": settings.MQTT_TLS_PORT,
    }
    assert response["Cache-Control"] == "no-store"
    assert verify_secret(body["password"], DeviceCredential.objects.get(device=device).password_hash)


def test_api_accepts_a_good_operator_secret_and_refuses_a_bad_one_with_a_message(operator):
    device = DeviceFactory(client_id="device-api2")
    client = api_client(operator)
    bad = client.post(
        f"/api/v1/devices/{device.client_id}/credentials/",
        {"password": "device-api2-and-more-characters-here"},
        format="json",
    )
    assert bad.status_code == 400
    assert "client id" in str(bad.json()["password"])
    good_secret = "Vq3#nL8@tR5!wZ2$kP9&mX4*hB7^cJ6%"
    good = client.post(f"/api/v1/devices/{device.client_id}/credentials/", {"password": good_secret}, format="json")
    assert good.status_code == 201 and good.json()["password"] == good_secret
    assert DeviceCredential.objects.get(device=device).source == DeviceCredential.Source.OPERATOR


def test_api_credentials_permissions_and_unknown_device(support, auditor, operator):
    device = DeviceFactory(client_id="device-api3")
    for user in (support, auditor):
        assert api_client(user).post(f"/api/v1/devices/{device.client_id}/credentials/").status_code == 403
    assert APIClient().post(f"/api/v1/devices/{device.client_id}/credentials/").status_code == 401
    assert api_client(operator).post("/api/v1/devices/device-nope/credentials/").status_code == 404
    assert not DeviceCredential.objects.exists()


def test_device_panel_shows_state_and_the_issue_button(client, operator):
    device = DeviceFactory(client_id="device-ui1")
    client.force_login(operator)
    page = client.get(f"/devices/{device.client_id}/").content.decode()
    assert "Issue secret" in page and "none" in page
    services.credential_issue(actor=operator, device=device)
    page = client.get(f"/devices/{device.client_id}/").content.decode()
    assert "Issue new secret" in page and "data-confirm" in page and "pending" in page


def test_device_panel_hides_the_button_from_roles_that_cannot_issue(client, support):
    device = DeviceFactory(client_id="device-ui2")
    client.force_login(support)
    page = client.get(f"/devices/{device.client_id}/").content.decode()
    assert "Issue secret" not in page
    assert client.post(f"/devices/{device.client_id}/credentials/issue/").status_code == 403


def test_issue_page_shows_the_secret_once_and_is_never_cached(client, operator, settings):
    device = DeviceFactory(client_id="device-ui3")
    client.force_login(operator)
    response = client.post(f"/devices/{device.client_id}/credentials/issue/")
    assert response.status_code == 200
    assert response["Cache-Control"] == "no-store"
    html = response.content.decode()
    secret = re.search(r'<code id="device-secret" class="mono">([^<]+)</code>', html).group(1)
    assert verify_secret(secret, DeviceCredential.objects.get(device=device).password_hash)
    assert f"mosquitto_pub -h {settings.MQTT_PUBLIC_HOST} -p {settings.MQTT_PORT} -i device-ui3 -u device-ui3" in html
    assert "mqtt.CallbackAPIVersion.VERSION2" in html
    # Not in the session, and the device page never shows it again.
    assert secret not in str(dict(client.session))
    assert secret not in client.get(f"/devices/{device.client_id}/").content.decode()
    # A GET does not issue or show anything: it goes back to the device.
    again = client.get(f"/devices/{device.client_id}/credentials/issue/")
    assert again.status_code == 302 and secret not in again.content.decode()


def test_issue_page_refuses_a_weak_secret_with_a_message(client, operator):
    device = DeviceFactory(client_id="device-ui4")
    client.force_login(operator)
    response = client.post(f"/devices/{device.client_id}/credentials/issue/", {"password": "short"}, follow=True)
    assert "at least" in response.content.decode()
    assert not DeviceCredential.objects.exists()


def test_service_callers_issue_without_a_user_only_inside_an_audit_context():
    from security.audit import audit_context

    device = DeviceFactory(client_id="device-svc")
    with pytest.raises(PermissionDenied):
        services.credential_issue(actor=None, device=device)
    with audit_context(service="simulator"):
        issued = services.credential_issue(actor=None, device=device)
    assert verify_secret(issued.password, DeviceCredential.objects.get(device=device).password_hash)
    assert AuditEvent.objects.get(action="credential.issue").actor_label == "service:simulator"


@pytest.mark.integration
def test_api_answer_says_when_the_broker_does_not_enforce_the_secret_yet(operator, mosquitto):
    """No worker applies the change here: after the wait the answer says `enforced: false`, and it is true, the
    broker refuses the secret. The secret is issued all the same (the change stays in the outbox)."""
    device = DeviceFactory(client_id="device-wait0")
    response = api_client(operator).post(f"/api/v1/devices/{device.client_id}/credentials/?wait=0.3", format="json")
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["enforced"] is False
    assert EnforcementChange.objects.get(pk=body["change"]).state == "pending"
    code = raw_connect_code(
        mosquitto.port, client_id="device-wait0", username="device-wait0", password=body["password"]
    )
    assert code != 0
    assert verify_secret(body["password"], DeviceCredential.objects.get(device=device).password_hash)


@pytest.mark.parametrize("wait", ["soon", "-1", "10.5"])
def test_api_wait_must_be_seconds_up_to_ten_and_a_bad_one_issues_nothing(operator, wait):
    device = DeviceFactory(client_id="device-wait1")
    response = api_client(operator).post(f"/api/v1/devices/{device.client_id}/credentials/?wait={wait}")
    assert response.status_code == 400, response.content
    assert "wait" in response.json()
    assert not DeviceCredential.objects.filter(device=device).exists()
    assert not EnforcementChange.objects.filter(client_id="device-wait1").exists()
