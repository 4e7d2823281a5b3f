"""Alert services, pages and API: deduplication, acknowledge/resolve with audit, filters, notifications, the
automatic response, and the broker's unknown-credential drift becoming an alert."""

import hashlib
import hmac
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from django.core import mail
from django.core.exceptions import PermissionDenied, ValidationError
from django.test import override_settings
from django.urls import reverse
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from devices.models import Device
from security.audit import audit_context
from security.detection import notify
from security.detection.alerts import alert_acknowledge, alert_auto_respond, alert_raise, alert_resolve
from security.models import Alert, AuditEvent, DeviceAction
from tests.factories import DeviceFactory

pytestmark = pytest.mark.django_db


def alert_seed(device=None, *, kind="rate_anomaly", subject=None, **kwargs):
    """An open alert raised the way the consumer raises them (as a service)."""
    with audit_context(service="detection"):
        alert, _ = alert_raise(
            kind=kind,
            subject=subject or (device.client_id if device else "10.0.0.9"),
            summary=kwargs.pop("summary", "seeded alert"),
            device=device,
            evidence=kwargs.pop("evidence", {"counts": {"messages": 1}}),
            **kwargs,
        )
    return alert


def test_repeated_events_update_one_open_alert():
    device = DeviceFactory()
    first = alert_seed(device, evidence={"counts": {"messages": 3}, "samples": [1]})
    for i in range(30):
        again = alert_seed(device, evidence={"counts": {"messages": 2}, "samples": [i]})
    assert again.pk == first.pk
    alert = Alert.objects.get()
    assert alert.occurrences == 31 and alert.evidence["counts"]["messages"] == 63
    assert len(alert.evidence["samples"]) == 20 and alert.evidence["samples"][-1] == 29
    # Only the opening is audited, not every occurrence.
    assert AuditEvent.objects.filter(action="alert.raised").count() == 1


def test_a_higher_severity_escalates_the_open_alert_and_a_resolved_one_is_history(support):
    device = DeviceFactory()
    alert = alert_seed(device, kind="auth_failures", subject="10.1.1.1", severity="low")
    alert_seed(device, kind="auth_failures", subject="10.1.1.1", severity="high")
    alert.refresh_from_db()
    assert alert.severity == "high" and AuditEvent.objects.filter(action="alert.escalated").exists()
    alert_resolve(actor=support, alert=alert, comment="blocked at the firewall")
    fresh = alert_seed(device, kind="auth_failures", subject="10.1.1.1", severity="low")
    assert fresh.pk != alert.pk and Alert.objects.count() == 2


def test_acknowledge_and_resolve_record_who_when_and_why(support, auditor):
    alert = alert_seed(DeviceFactory())
    with pytest.raises(PermissionDenied):
        alert_acknowledge(actor=auditor, alert=alert, comment="no")
    alert_acknowledge(actor=support, alert=alert, comment="looking")
    alert.refresh_from_db()
    assert (alert.state, alert.acknowledged_by, alert.acknowledge_comment) == ("acknowledged", support, "looking")
    with pytest.raises(ValidationError):
        alert_acknowledge(actor=support, alert=alert)
    alert_resolve(actor=support, alert=alert, comment="done")
    event = AuditEvent.objects.get(action="alert.resolved")
    assert event.actor == support and event.object_id == str(alert.pk) and event.after["comment"] == "done"
    with pytest.raises(ValidationError):
        alert_resolve(actor=support, alert=alert)


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError):
        alert_raise(kind="made_up", subject="x", summary="x")


def test_api_filters_and_actions(support):
    a = DeviceFactory(client_id="device-aaa")
    alert_seed(a, kind="rate_anomaly")
    alert_seed(a, kind="subscription_violation")
    other = alert_seed(DeviceFactory(client_id="device-bbb"), kind="rate_anomaly", severity="critical")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=support).key}")
    body = client.get("/api/v1/alerts/", {"device": "device-aaa"}).json()
    assert body["count"] == 2 and {r["device"] for r in body["results"]} == {"device-aaa"}
    body = client.get("/api/v1/alerts/", {"kind": "rate_anomaly", "severity": "critical"}).json()
    assert [r["id"] for r in body["results"]] == [other.pk]
    assert client.get("/api/v1/alerts/", {"severity": "loud"}).status_code == 400
    response = client.post(f"/api/v1/alerts/{other.pk}/resolve/", {"comment": "ok"}, format="json")
    assert response.status_code == 200 and response.json()["state"] == "resolved"
    assert client.get("/api/v1/alerts/", {"state": "open"}).json()["count"] == 2
    again = client.post(f"/api/v1/alerts/{other.pk}/acknowledge/", {}, format="json")
    assert again.status_code == 400 and "resolved" in again.content.decode()


def test_pages_list_detail_and_act(client, support, auditor):
    device = DeviceFactory(client_id="device-page")
    alert = alert_seed(device, kind="client_id_conflict", summary="A second connection took over device-page")
    client.force_login(auditor)
    page = client.get(reverse("alert-list"))
    assert page.status_code == 200 and "A second connection took over device-page" in page.content.decode()
    assert 'hx-trigger="every 5s"' in page.content.decode()
    detail = client.get(reverse("alert-detail", args=[alert.pk])).content.decode()
    assert reverse("device-detail", args=["device-page"]) in detail and "can read alerts but not" in detail
    assert client.post(reverse("alert-acknowledge", args=[alert.pk])).status_code == 403
    client.force_login(support)
    detail = client.get(reverse("alert-detail", args=[alert.pk])).content.decode()
    assert reverse("device-quarantine", args=["device-page"]) in detail
    client.post(reverse("alert-resolve", args=[alert.pk]), {"comment": "kicked the clone"})
    alert.refresh_from_db()
    assert alert.state == "resolved" and alert.resolve_comment == "kicked the clone"
    card = client.get(reverse("alert-overview-card")).content.decode()
    assert "<svg" in card and "alert-chart" in card
    fragment = client.get(reverse("device-alerts", args=["device-page"])).content.decode()
    assert "No open alerts for this device" in fragment


def test_nav_shows_alerts_only_to_roles_that_can_read_them(client, support, user_with_role):
    client.force_login(support)
    assert reverse("alert-list") in client.get(reverse("overview")).content.decode()
    client.force_login(user_with_role(None, "nobody"))
    assert client.get(reverse("alert-list")).status_code == 403


def test_list_page_queries_do_not_grow_with_the_number_of_alerts(client, support, django_assert_max_num_queries):
    client.force_login(support)
    for i in range(3):
        alert_seed(DeviceFactory(), subject=f"s{i}")
    with django_assert_max_num_queries(12) as small:
        client.get(reverse("alert-list"))
    for i in range(40):
        alert_seed(DeviceFactory(), subject=f"t{i}")
    with django_assert_max_num_queries(len(small.captured_queries)):
        client.get(reverse("alert-list"))


@override_settings(
    DETECTION_EMAIL_RECIPIENTS=["oncall@example.test"],
    DETECTION_EMAIL_MIN_SEVERITY="high",
    EMAIL_BACKEND="django.core.mail.backends.locmem.EmailBackend",
)
def test_email_is_sent_from_the_threshold_up():
    from security.tasks import notify_alert

    low = alert_seed(DeviceFactory(), kind="value_out_of_range")
    high = alert_seed(DeviceFactory(), kind="client_id_conflict")
    notify_alert.apply(args=(low.pk,))
    assert mail.outbox == []
    notify_alert.apply(args=(high.pk,))
    assert len(mail.outbox) == 1 and "client_id_conflict" in mail.outbox[0].body
    high.refresh_from_db()
    assert high.response["notifications"]["email"] == "sent"


class _Receiver(BaseHTTPRequestHandler):
    received: list = []
    fail_first = 0

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if _Receiver.fail_first > 0:
            _Receiver.fail_first -= 1
            self.send_response(503)
            self.end_headers()
            return
        _Receiver.received.append((self.headers[notify.SIGNATURE_HEADER], body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def webhook_receiver():
    server = HTTPServer(("127.0.0.1", 0), _Receiver)
    _Receiver.received, _Receiver.fail_first = [], 0
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/hook", _Receiver
    server.shutdown()
    server.server_close()


def test_webhook_is_signed_and_retried_after_a_failure(webhook_receiver):
    from security.tasks import notify_alert

    url, receiver = webhook_receiver
    receiver.fail_first = 1
    with override_settings(
        DETECTION_WEBHOOK_URL=url, DETECTION_WEBHOOK_SECRET="s3cret", DETECTION_WEBHOOK_MIN_SEVERITY="medium"
    ):
        alert = alert_seed(DeviceFactory(), kind="oversize_packet")
        result = notify_alert.apply(args=(alert.pk,))
    assert result.successful(), result.traceback
    assert len(receiver.received) == 1
    signature, body = receiver.received[0]
    assert signature == "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert json.loads(body)["alert"]["id"] == alert.pk


def test_automatic_quarantine_only_when_configured_and_always_audited():
    device = DeviceFactory()
    alert = alert_seed(device, kind="credential_cloned")
    assert alert.severity == "critical"
    with audit_context(service="detection-response"):
        assert alert_auto_respond(alert_id=alert.pk) == "not configured for this alert"
        with override_settings(DETECTION_AUTO_QUARANTINE_KINDS=["credential_cloned"]):
            assert alert_auto_respond(alert_id=alert.pk) == "quarantined"
    device.refresh_from_db()
    assert device.status == Device.Status.QUARANTINED
    assert AuditEvent.objects.filter(action="device.quarantine", actor_label="service:detection-response").exists()
    assert AuditEvent.objects.filter(action="alert.auto_response").exists()
    alert.refresh_from_db()
    assert alert.response["action"] == "quarantine"
    # The one path for every status change: the same pending, verifiable DeviceAction a person's click creates,
    # linked to the alert that caused it.
    action = DeviceAction.objects.get(client_id=device.client_id)
    assert (action.action, action.state, action.alert_id) == ("quarantine", "pending", alert.pk)
    assert action.change is not None and action.change.kind == "device.quarantine"
    assert action.requested_by_label == "service:detection-response"


def test_a_credential_on_the_broker_the_console_did_not_issue_becomes_a_critical_alert(mosquitto, operator):
    import os
    import signal

    from security import services
    from security.enforcement.secrets import hash_secret

    device = DeviceFactory(client_id="device-owned")
    services.credential_issue(actor=operator, device=device)
    services.enforcement_apply(coalesce=False)
    passwd = mosquitto.dir / "passwd"
    passwd.write_text(passwd.read_text() + "device-intruder:" + hash_secret("let-me-in-please", iterations=1) + "\n")
    os.kill(int((mosquitto.dir / "mosquitto.pid").read_text()), signal.SIGHUP)

    with audit_context(service="broker-reconcile"):
        services.broker_reconcile(trigger="test")

    alert = Alert.objects.get(kind="unknown_credential")
    assert (alert.severity, alert.subject, alert.device) == ("critical", "device-intruder", None)
    assert alert.evidence["removed"] is True and alert.state == "open"


def test_the_worker_has_the_consumer_option_and_the_command_has_help():
    import subprocess
    import sys

    from django.conf import settings

    help_text = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "fleet", "worker", "--help"],
        capture_output=True,
        text=True,
        cwd=settings.BASE_DIR,
        timeout=60,
    ).stdout
    assert "--mqtt-consumer" in help_text and "--mqtt-consumer-replica" in help_text
    out = subprocess.run(
        [sys.executable, "manage.py", "consume", "--help"], capture_output=True, text=True, cwd=settings.BASE_DIR
    ).stdout
    assert "--replica" in out and "--no-monitor" in out
