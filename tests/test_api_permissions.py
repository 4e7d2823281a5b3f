"""Every API endpoint for every role: who gets in, who gets 403 (or 401 when anonymous), and an audit
event with actor, source address and request id for every change that went through.

When you add an endpoint, add a row to ENDPOINTS: test_every_api_route_is_in_the_table fails until you do.
"""

import itertools
import re
import uuid

import pytest
from django.urls import URLPattern, URLResolver, get_resolver
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from devices.firmware.services import firmware_release_create
from devices.models import Device, DeviceGroup, DeviceModel, ImportJob
from security.audit import audit_context, audit_record
from security.models import Alert, AuditEvent, BulkAction, CredentialRotation, DeviceAction, RotationCampaign
from security.payloads import payload_key_issue
from security.pki.services import broker_server_cert_ensure, certificate_factory_bundle
from tests.conftest import make_user
from tests.factories import PASSWORD, DeviceFactory, DeviceGroupFactory, DeviceModelFactory
from tests.security.pki_helpers import csr_for
from tests.security.test_alerts import alert_seed

pytestmark = pytest.mark.django_db

ROLES = ("admin", "operator", "support", "auditor", "norole", "anonymous")
EVERYONE = {"admin", "operator", "support", "auditor", "norole"}
INVENTORY_READERS = {"admin", "operator", "support", "auditor"}
FLEET_WRITERS = {"admin", "operator"}
IMPORT_READERS = {"admin", "operator", "auditor"}
AUDIT_READERS = {"admin", "auditor"}
REVOKERS = {"admin", "support"}
ALERT_WORKERS = {"admin", "support"}


def _token_body(ctx):
    if ctx["username"] is None:  # anonymous: someone without an account guessing
        return {"username": "nobody", "password": "guess"}
    return {"username": ctx["username"], "password": PASSWORD}


# (name, method, url(ctx), body(ctx) or None, format, roles allowed, success status, audited action or None)
ENDPOINTS = [
    ("token", "post", lambda c: "/api/v1/auth/token/", _token_body, "json", EVERYONE, 200, "auth.token_issue"),
    ("schema", "get", lambda c: "/api/v1/schema/", None, None, EVERYONE, 200, None),
    ("docs", "get", lambda c: "/api/v1/docs/", None, None, EVERYONE, 200, None),
    ("device-list", "get", lambda c: "/api/v1/devices/", None, None, INVENTORY_READERS, 200, None),
    ("device-detail", "get", lambda c: "/api/v1/devices/device-perm/", None, None, INVENTORY_READERS, 200, None),
    (
        "device-create",
        "post",
        lambda c: "/api/v1/devices/",
        lambda c: {"client_id": "device-new", "model": "Model-A", "groups": ["group-a"]},
        "json",
        FLEET_WRITERS,
        201,
        "device.create",
    ),
    (
        "device-patch",
        "patch",
        lambda c: "/api/v1/devices/device-perm/",
        lambda c: {"name": "renamed"},
        "json",
        FLEET_WRITERS,
        200,
        "device.update",
    ),
    (
        "device-put",
        "put",
        lambda c: "/api/v1/devices/device-perm/",
        lambda c: {"client_id": "device-perm", "name": "replaced", "groups": []},
        "json",
        FLEET_WRITERS,
        200,
        "device.update",
    ),
    (
        "device-delete",
        "delete",
        lambda c: "/api/v1/devices/device-perm/",
        None,
        None,
        FLEET_WRITERS,
        204,
        "device.delete",
    ),
    (
        "device-import",
        "post",
        lambda c: "/api/v1/devices/import/",
        lambda c: "client_id\ndevice-imp\n",
        "csv",
        FLEET_WRITERS,
        202,
        "import.submit",
    ),
    ("import-list", "get", lambda c: "/api/v1/imports/", None, None, IMPORT_READERS, 200, None),
    ("import-detail", "get", lambda c: f"/api/v1/imports/{c['job']}/", None, None, IMPORT_READERS, 200, None),
    ("model-list", "get", lambda c: "/api/v1/models/", None, None, INVENTORY_READERS, 200, None),
    ("model-detail", "get", lambda c: f"/api/v1/models/{c['model']}/", None, None, INVENTORY_READERS, 200, None),
    (
        "model-create",
        "post",
        lambda c: "/api/v1/models/",
        lambda c: {"name": "Model-new"},
        "json",
        FLEET_WRITERS,
        201,
        "devicemodel.create",
    ),
    (
        "model-patch",
        "patch",
        lambda c: f"/api/v1/models/{c['model']}/",
        lambda c: {"latest_firmware": "9.9"},
        "json",
        FLEET_WRITERS,
        200,
        "devicemodel.update",
    ),
    (
        "model-put",
        "put",
        lambda c: f"/api/v1/models/{c['model']}/",
        lambda c: {"name": "Model-A", "manufacturer": "Other"},
        "json",
        FLEET_WRITERS,
        200,
        "devicemodel.update",
    ),
    (
        "model-delete",
        "delete",
        lambda c: f"/api/v1/models/{c['unused_model']}/",
        None,
        None,
        FLEET_WRITERS,
        204,
        "devicemodel.delete",
    ),
    ("group-list", "get", lambda c: "/api/v1/groups/", None, None, INVENTORY_READERS, 200, None),
    ("group-detail", "get", lambda c: f"/api/v1/groups/{c['group']}/", None, None, INVENTORY_READERS, 200, None),
    (
        "group-create",
        "post",
        lambda c: "/api/v1/groups/",
        lambda c: {"name": "group-new"},
        "json",
        FLEET_WRITERS,
        201,
        "devicegroup.create",
    ),
    (
        "group-patch",
        "patch",
        lambda c: f"/api/v1/groups/{c['group']}/",
        lambda c: {"description": "north site"},
        "json",
        FLEET_WRITERS,
        200,
        "devicegroup.update",
    ),
    (
        "group-put",
        "put",
        lambda c: f"/api/v1/groups/{c['group']}/",
        lambda c: {"name": "group-a", "description": "replaced"},
        "json",
        FLEET_WRITERS,
        200,
        "devicegroup.update",
    ),
    (
        "group-delete",
        "delete",
        lambda c: f"/api/v1/groups/{c['group']}/",
        None,
        None,
        FLEET_WRITERS,
        204,
        "devicegroup.delete",
    ),
    # Broker enforcement (security/api/views/broker.py).
    (
        "device-credentials",
        "post",
        lambda c: "/api/v1/devices/device-perm/credentials/",
        lambda c: {},
        "json",
        FLEET_WRITERS,
        201,
        "credential.issue",
    ),
    ("policy", "get", lambda c: "/api/v1/policy/", None, None, INVENTORY_READERS, 200, None),
    # Payload encryption (security/api/views/payload_keys.py): device-perm has a key (the inventory fixture).
    (
        "payload-key",
        "get",
        lambda c: "/api/v1/devices/device-perm/payload-key/",
        None,
        None,
        INVENTORY_READERS,
        200,
        None,
    ),
    (
        "payload-key-issue",
        "post",
        lambda c: "/api/v1/devices/device-perm/payload-key/",
        lambda c: {"required": True},
        "json",
        FLEET_WRITERS,
        201,
        "payload_key.reissue",
    ),
    (
        "payload-key-require",
        "patch",
        lambda c: "/api/v1/devices/device-perm/payload-key/",
        lambda c: {"required": True},
        "json",
        FLEET_WRITERS,
        200,
        "payload_key.require",
    ),
    # Posture audit (security/api/views/posture.py): every role that reads the inventory reads the reports;
    # operator and admin run one (audited).
    ("posture", "get", lambda c: "/api/v1/posture/", None, None, INVENTORY_READERS, 200, None),
    ("posture-reports", "get", lambda c: "/api/v1/posture/reports/", None, None, INVENTORY_READERS, 200, None),
    ("posture-run", "post", lambda c: "/api/v1/posture/run/", None, None, FLEET_WRITERS, 202, "posture.run_requested"),
    (
        "policy-sync",
        "post",
        lambda c: "/api/v1/policy/sync/",
        None,
        None,
        FLEET_WRITERS,
        202,
        "broker.sync_requested",
    ),
    # Revocation and quarantine (security/api/views/revocation.py): support and admin revoke and quarantine,
    # operator and admin reinstate; everyone who reads the inventory reads the actions and bulk jobs.
    (
        "device-revoke",
        "post",
        lambda c: "/api/v1/devices/device-perm/revoke/",
        lambda c: {"reason": "permission check"},
        "json",
        REVOKERS,
        202,
        "device.revoke",
    ),
    (
        "device-quarantine",
        "post",
        lambda c: "/api/v1/devices/device-perm/quarantine/",
        lambda c: {"reason": "permission check"},
        "json",
        REVOKERS,
        202,
        "device.quarantine",
    ),
    (
        "device-reinstate",
        "post",
        lambda c: "/api/v1/devices/device-held/reinstate/",
        lambda c: {"reason": "permission check"},
        "json",
        FLEET_WRITERS,
        202,
        "device.reinstate",
    ),
    (
        "device-action-detail",
        "get",
        lambda c: f"/api/v1/device-actions/{c['action']}/",
        None,
        None,
        INVENTORY_READERS,
        200,
        None,
    ),
    (
        "bulk-revoke",
        "post",
        lambda c: "/api/v1/devices/bulk/revoke/",
        lambda c: {"filters": {"search": "device-perm"}, "reason": "permission check", "confirm_count": 1},
        "json",
        REVOKERS,
        202,
        "bulk.revoke_requested",
    ),
    (
        "bulk-quarantine",
        "post",
        lambda c: "/api/v1/devices/bulk/quarantine/",
        lambda c: {"filters": {"search": "device-perm"}, "reason": "permission check", "confirm_count": 1},
        "json",
        REVOKERS,
        202,
        "bulk.quarantine_requested",
    ),
    ("bulk-detail", "get", lambda c: f"/api/v1/bulk-actions/{c['bulk']}/", None, None, INVENTORY_READERS, 200, None),
    # Alerts (detection, issue 6): everyone who reads the inventory reads alerts; support and admin work them.
    ("alert-list", "get", lambda c: "/api/v1/alerts/", None, None, INVENTORY_READERS, 200, None),
    ("alert-detail", "get", lambda c: f"/api/v1/alerts/{c['alert']}/", None, None, INVENTORY_READERS, 200, None),
    (
        "alert-acknowledge",
        "post",
        lambda c: f"/api/v1/alerts/{c['alert']}/acknowledge/",
        lambda c: {"comment": "on it"},
        "json",
        ALERT_WORKERS,
        200,
        "alert.acknowledged",
    ),
    (
        "alert-resolve",
        "post",
        lambda c: f"/api/v1/alerts/{c['alert']}/resolve/",
        lambda c: {"comment": "fixed"},
        "json",
        ALERT_WORKERS,
        200,
        "alert.resolved",
    ),
    ("audit-list", "get", lambda c: "/api/v1/audit-log/", None, None, AUDIT_READERS, 200, None),
    ("audit-detail", "get", lambda c: f"/api/v1/audit-log/{c['event']}/", None, None, AUDIT_READERS, 200, None),
    # --- pki (issue 8) ---
    ("pki-ca", "get", lambda c: "/api/v1/pki/ca/", None, None, INVENTORY_READERS, 200, None),
    (
        "device-certificates",
        "get",
        lambda c: "/api/v1/devices/device-perm/certificates/",
        None,
        None,
        INVENTORY_READERS,
        200,
        None,
    ),
    (
        "device-certificate-issue",
        "post",
        lambda c: "/api/v1/devices/device-perm/certificates/",
        lambda c: {"csr": c["csr"]},
        "json",
        FLEET_WRITERS,
        201,
        "certificate.issue",
    ),
    (
        "device-certificate-bundle",
        "post",
        lambda c: "/api/v1/devices/device-perm/certificates/bundle/",
        lambda c: {},
        "json",
        FLEET_WRITERS,
        201,
        "certificate.factory_issue",
    ),
    (
        "device-certificate-revoke",
        "post",
        lambda c: f"/api/v1/devices/device-perm/certificates/{c['certificate']}/revoke/",
        lambda c: {"reason": "lost in transit"},
        "json",
        REVOKERS,
        200,
        "certificate.revoke",
    ),
    # --- rotation campaigns (issue 7): operator and admin start and steer them; inventory readers read them ---
    ("campaign-list", "get", lambda c: "/api/v1/rotation-campaigns/", None, None, INVENTORY_READERS, 200, None),
    (
        "campaign-create",
        "post",
        lambda c: "/api/v1/rotation-campaigns/",
        lambda c: {
            "name": "perm",
            "reason": "permission check",
            "kind": "certificate",
            "filters": {"search": "device-perm"},
            "confirm_count": 1,
        },
        "json",
        FLEET_WRITERS,
        201,
        "rotation_campaign.create",
    ),
    (
        "campaign-preview",
        "post",
        lambda c: "/api/v1/rotation-campaigns/preview/",
        lambda c: {"filters": {"search": "device-perm"}},
        "json",
        FLEET_WRITERS,
        200,
        None,
    ),
    (
        "campaign-detail",
        "get",
        lambda c: f"/api/v1/rotation-campaigns/{c['campaign']}/",
        None,
        None,
        INVENTORY_READERS,
        200,
        None,
    ),
    (
        "campaign-pause",
        "post",
        lambda c: f"/api/v1/rotation-campaigns/{c['campaign']}/pause/",
        lambda c: {"reason": "permission check"},
        "json",
        FLEET_WRITERS,
        200,
        "rotation_campaign.pause",
    ),
    (
        "campaign-resume",
        "post",
        lambda c: f"/api/v1/rotation-campaigns/{c['paused_campaign']}/resume/",
        lambda c: {},
        "json",
        FLEET_WRITERS,
        200,
        "rotation_campaign.resume",
    ),
    (
        "campaign-abort",
        "post",
        lambda c: f"/api/v1/rotation-campaigns/{c['campaign']}/abort/",
        lambda c: {"reason": "permission check"},
        "json",
        FLEET_WRITERS,
        200,
        "rotation_campaign.abort",
    ),
    # --- credential rotation (issue 7, the handover): operator and admin rotate; inventory readers read them ---
    (
        "device-rotate",
        "post",
        lambda c: "/api/v1/devices/device-perm/rotate/",
        None,
        None,
        FLEET_WRITERS,
        202,
        "rotation.start",
    ),
    ("rotation-list", "get", lambda c: "/api/v1/rotations/", None, None, INVENTORY_READERS, 200, None),
    # --- firmware registry (docs/firmware.md): every inventory reader reads; operator and admin sign, offer, flag ---
    ("firmware-list", "get", lambda c: "/api/v1/firmware/", None, None, INVENTORY_READERS, 200, None),
    ("firmware-detail", "get", lambda c: f"/api/v1/firmware/{c['release']}/", None, None, INVENTORY_READERS, 200, None),
    (
        "firmware-signing-key",
        "get",
        lambda c: "/api/v1/firmware/signing-key/",
        None,
        None,
        INVENTORY_READERS,
        200,
        None,
    ),
    (
        "firmware-create",
        "post",
        lambda c: "/api/v1/firmware/",
        lambda c: {
            "model": "Model-A",
            "version": "9.9.9",
            "url": "https://cdn.example/fw.bin",
            "sha256": "ab" * 32,
            "size": 10,
        },
        "json",
        FLEET_WRITERS,
        201,
        "firmware.release",
    ),
    (
        "firmware-withdraw",
        "post",
        lambda c: f"/api/v1/firmware/{c['release']}/withdraw/",
        lambda c: {"reason": "permission check"},
        "json",
        FLEET_WRITERS,
        200,
        "firmware.withdraw",
    ),
    (
        "firmware-vulnerable",
        "post",
        lambda c: f"/api/v1/firmware/{c['release']}/vulnerable/",
        lambda c: {"advisory": "CVE-0000-0000 permission check"},
        "json",
        FLEET_WRITERS,
        200,
        "firmware.mark_vulnerable",
    ),
    (
        "firmware-offer",
        "post",
        lambda c: f"/api/v1/firmware/{c['release']}/offer/",
        lambda c: {"client_ids": ["device-perm"]},
        "json",
        FLEET_WRITERS,
        202,
        "firmware.offer",
    ),
    (
        "rotation-detail",
        "get",
        lambda c: f"/api/v1/rotations/{c['rotation']}/",
        None,
        None,
        INVENTORY_READERS,
        200,
        None,
    ),
]

# Successful calls that change something other than the inventory rows _state() compares.
OUTSIDE_THE_INVENTORY = {"token", "device-credentials", "policy-sync"}
OUTSIDE_THE_INVENTORY |= {"device-certificate-issue", "device-certificate-bundle", "device-certificate-revoke"}
OUTSIDE_THE_INVENTORY |= {"campaign-create", "campaign-pause", "campaign-resume", "campaign-abort"}
OUTSIDE_THE_INVENTORY |= {"firmware-vulnerable", "firmware-offer"}  # the registry's rows, not the inventory's
OUTSIDE_THE_INVENTORY |= {"posture-run"}
OUTSIDE_THE_INVENTORY |= {"payload-key-issue", "payload-key-require"}

# The table written out: expected status per endpoint and role. Anonymous callers get 401 (token auth
# comes first), except on the docs page, which is for people and sends them to the login page.
EXPECTED = {
    (name, role): ((400 if name == "token" else 401) if role == "anonymous" else success if role in allowed else 403)
    for (name, _m, _u, _b, _f, allowed, success, _a), role in itertools.product(ENDPOINTS, ROLES)
}
EXPECTED[("docs", "anonymous")] = 302


@pytest.fixture
def inventory():
    model = DeviceModelFactory(name="Model-A")
    group = DeviceGroupFactory(name="group-a")
    device = DeviceFactory(client_id="device-perm", model=model)
    device.groups.add(group)
    unused = DeviceModelFactory(name="Model-unused")
    job = ImportJob.objects.create(filename="old.csv", content="client_id\n")
    event = audit_record(actor="setup", action="setup.seed")
    held = DeviceFactory(client_id="device-held", status=Device.Status.QUARANTINED)
    action = DeviceAction.objects.create(
        device=held, client_id=held.client_id, action="quarantine", reason="seed", requested_by_label="setup"
    )
    bulk = BulkAction.objects.create(action="revoke", reason="seed", created_by_label="setup")
    with audit_context(service="setup"):  # the CAs and one certificate exist before the call (pki, issue 8)
        certificate = certificate_factory_bundle(actor=None, device=device).record.serial
        broker_server_cert_ensure()  # what the first broker render creates (audited), not a read's side effect
        payload_key_issue(actor=None, device=device)  # the payload-key rows read and re-issue it
    alert = alert_seed(device)
    campaign = RotationCampaign.objects.create(name="seed", state="running", created_by_label="setup")
    paused_campaign = RotationCampaign.objects.create(name="seed-paused", state="paused", created_by_label="setup")
    with audit_context(service="setup"):  # a signed release of Model-A (firmware registry), hosted elsewhere
        release = firmware_release_create(
            actor=None, model=model, version="1.0.0", url="https://cdn.example/1.bin", sha256="cd" * 32, size=10
        )
    rotation = CredentialRotation.objects.create(
        device=held, client_id=held.client_id, command_id="seed", state="failed"
    )
    return {
        "campaign": campaign.pk,
        "paused_campaign": paused_campaign.pk,
        "rotation": rotation.pk,
        "release": release.pk,
        "model": model.pk,
        "unused_model": unused.pk,
        "group": group.pk,
        "job": job.pk,
        "event": event.pk,
        "action": action.pk,
        "bulk": bulk.pk,
        "certificate": certificate,
        "csr": csr_for("device-perm")[1],
        "alert": alert.pk,
    }


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=[e[0] for e in ENDPOINTS])
def test_endpoint_for_role(endpoint, role, inventory):
    name, method, url, body, fmt, _allowed, success, audited_action = endpoint
    user = None if role == "anonymous" else make_user(None if role == "norole" else role, f"{role}-person")
    ctx = {**inventory, "username": user.username if user else None}
    client = APIClient()
    if user is not None and name == "docs":
        client.force_login(user)  # a page for people: a browser session
    elif user is not None and name != "token":
        # Automation's way in: a real token through TokenAuthentication.
        client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    request_id = f"perm-{uuid.uuid4().hex[:12]}"
    kwargs = {"HTTP_X_REQUEST_ID": request_id}
    if body is not None:
        data = body(ctx)
        if fmt == "csv":
            kwargs.update(data=data.encode(), content_type="text/csv")
        else:
            kwargs.update(data=data, format=fmt)
    events_before = AuditEvent.objects.count()
    snapshot_before = _state()

    response = getattr(client, method)(url(ctx), **kwargs)

    expected = EXPECTED[(name, role)]
    assert response.status_code == expected, (name, role, response.content[:300])
    assert response["X-Request-ID"] == request_id
    if expected == 302:
        assert response["Location"].startswith("/accounts/login/?next=")
    elif expected >= 400:
        message = response.content.decode()
        assert any(
            text in message
            for text in (
                "Authentication credentials were not provided",
                "Your role does not allow this",
                "Unable to log in with the given username and password",
            )
        ), message
        assert _state() == snapshot_before, "a refused call changed something"
        assert AuditEvent.objects.count() == events_before
    elif audited_action:
        # One call may record several events (revoking a device also revokes its certificates): the expected
        # one is there, and every event of the request names the caller and where the call came from.
        events = list(AuditEvent.objects.filter(request_id=request_id))
        assert audited_action in [e.action for e in events]
        for event in events:
            assert event.actor == user
            assert event.actor_label == user.username
            assert event.source_address == "127.0.0.1"
        if name not in OUTSIDE_THE_INVENTORY:
            assert _state() != snapshot_before
    else:
        assert AuditEvent.objects.count() == events_before, "a read wrote to the audit log"
        assert _state() == snapshot_before


def _state():
    return (
        sorted(Device.objects.values_list("client_id", "name", "status")),
        sorted(DeviceModel.objects.values_list("name", "manufacturer", "latest_firmware")),
        sorted(DeviceGroup.objects.values_list("name", "description")),
        ImportJob.objects.count(),
        DeviceAction.objects.count(),
        BulkAction.objects.count(),
        sorted(Alert.objects.values_list("id", "state")),
        CredentialRotation.objects.count(),
    )


def test_unknown_api_address_is_a_json_404(client):
    response = client.get("/api/v1/no-such-thing/")
    assert response.status_code == 404
    assert "no API endpoint at this address" in response.json()["detail"]
    response = client.get("/api/v1/devices")
    assert response.status_code == 404
    assert response.json()["detail"] == "API addresses end with a slash: /api/v1/devices/"


def test_table_has_every_role_for_every_endpoint():
    assert len(EXPECTED) == len(ENDPOINTS) * len(ROLES)
    assert EXPECTED[("audit-list", "operator")] == 403
    assert EXPECTED[("device-delete", "support")] == 403
    assert EXPECTED[("device-import", "auditor")] == 403
    assert EXPECTED[("import-list", "support")] == 403
    assert EXPECTED[("device-list", "norole")] == 403


def _api_routes(resolver=None, prefix=""):
    resolver = resolver or get_resolver()
    for entry in resolver.url_patterns:
        pattern = prefix + str(entry.pattern)
        if isinstance(entry, URLResolver):
            yield from _api_routes(entry, pattern)
        elif isinstance(entry, URLPattern) and pattern.startswith("api/v1/") and entry.name != "api-not-found":
            yield pattern


def _normalise(route: str) -> str:
    route = re.sub(r"\(\?P<[^>]+>[^)]*\)", "{}", route)
    route = re.sub(r"<[^>]+>", "{}", route)
    return "/" + route.replace("^", "").replace("$", "")


def test_every_api_route_is_in_the_table():
    ctx = {"model": 1, "unused_model": 1, "group": 1, "job": 1, "event": 1, "action": 1, "bulk": 1, "username": "x"}
    ctx["alert"] = 1
    ctx["certificate"] = 1  # pki (issue 8)
    ctx["campaign"] = ctx["paused_campaign"] = 1  # rotation campaigns (issue 7)
    ctx["rotation"] = 1  # credential rotation (issue 7)
    ctx["release"] = 1  # firmware registry
    covered = {re.sub(r"/(device-perm|device-held|\d+)/", "/{}/", url(ctx)) for _n, _m, url, *_ in ENDPOINTS}
    routes = {_normalise(r) for r in _api_routes()}
    assert routes - covered == set(), "API routes without a row in ENDPOINTS"
