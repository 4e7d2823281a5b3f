"""The posture audit (security/posture/, docs/posture.md): the pure parts alone, then real Mosquitto brokers: the
project's own rendered broker, and a deliberately weak one started from a hand-written insecure config."""

import getpass
import io
import json
import time
from pathlib import Path

import pytest
from django.core.management import call_command
from django.urls import reverse
from django.utils import timezone
from rest_framework.test import APIClient

from fleet.ports import free_port, wait_for_port
from security.models import Alert, AuditEvent, PostureReport
from security.posture import checks, context, runner
from security.posture import services as posture
from security.posture.context import FAIL, PASS, UNKNOWN, Finding
from tests.support.broker import MosquittoServer
from tests.support.detection import refusals_judged

# --- pure parts -------------------------------------------------------------------------------------------------------


def _finding(check_id, status, severity="high"):
    return Finding(id=check_id, title=check_id, severity=severity, status=status)


def test_every_check_has_a_place_in_the_order_and_a_fix():
    assert set(runner.ORDER) == set(checks.CHECKS)
    for spec in checks.CHECKS.values():
        assert spec.severity in context.SEVERITIES
        assert spec.fix.endswith(".") and spec.title


def test_summary_counts_by_status_and_failed_severity():
    result = runner.AuditResult(
        target={},
        findings=[
            _finding("a", FAIL, "critical"),
            _finding("b", FAIL, "medium"),
            _finding("c", PASS),
            _finding("d", UNKNOWN),
        ],
    )
    summary = result.summary()
    assert summary["fail"] == 2 and summary["pass"] == 1 and summary["unknown"] == 1 and summary["total"] == 4
    assert summary["failed_by_severity"]["critical"] == 1 and summary["failed_by_severity"]["high"] == 0


def test_a_check_that_raises_or_hangs_is_unknown_never_pass(monkeypatch):
    def boom(ctx):
        raise RuntimeError("socket exploded")

    def hang(ctx):
        time.sleep(2)
        return _finding("anonymous_connect", PASS)

    ctx = context.Context(target=context.Target("127.0.0.1", 1), check_timeout=1, deadline=time.monotonic() + 10)
    monkeypatch.setitem(
        checks.CHECKS,
        "wildcard_hash",
        checks.CHECKS["wildcard_hash"].__class__("wildcard_hash", "t", "high", "fix.", boom),
    )
    monkeypatch.setitem(
        checks.CHECKS,
        "anonymous_connect",
        checks.CHECKS["anonymous_connect"].__class__("anonymous_connect", "t", "critical", "fix.", hang),
    )
    raised = runner.run_check(ctx, "wildcard_hash", budget=1)
    assert raised.status == UNKNOWN and "socket exploded" in raised.evidence["why"]
    hung = runner.run_check(ctx, "anonymous_connect", budget=0.3)
    assert hung.status == UNKNOWN and "did not finish" in hung.evidence["why"]


def test_a_broker_nobody_listens_on_gives_unknowns_within_the_budget():
    port = free_port()  # nothing listens there
    started = time.monotonic()
    result = runner.audit_run(
        context.Target("127.0.0.1", port, tls_port=free_port()), total_timeout=10, check_timeout=1
    )
    assert time.monotonic() - started < 10
    assert {f.status for f in result.findings} == {UNKNOWN}, [(f.id, f.status) for f in result.findings]


def test_changes_since_the_previous_run_put_new_failures_first(db):
    previous = PostureReport.objects.create(
        state="done",
        findings=[_finding("a", PASS).as_dict(), _finding("b", FAIL).as_dict(), _finding("c", PASS).as_dict()],
    )
    report = PostureReport.objects.create(
        state="done",
        findings=[_finding("a", FAIL).as_dict(), _finding("b", PASS).as_dict(), _finding("c", PASS).as_dict()],
    )
    changes = posture.posture_changes(report, previous)
    assert [(c["id"], c["before"], c["after"], c["worse"]) for c in changes] == [
        ("a", "pass", "fail", True),
        ("b", "fail", "pass", False),
    ]
    assert posture.posture_previous(report) == previous
    groups = dict(posture.findings_by_severity(report))
    assert [f["id"] for f in groups["failed: high"]] == ["a"] and len(groups["passed"]) == 2


def test_the_daily_schedule_exists_after_migrate(db):
    from django_celery_beat.models import PeriodicTask

    task = PeriodicTask.objects.get(task=posture.TASK_NAME)
    assert task.enabled and task.interval.every == 24 and task.interval.period == "hours"


# --- a deliberately weak broker ---------------------------------------------------------------------------------------

WEAK_CONFIG = """# Deliberately insecure: the posture audit must fail it.
allow_anonymous true
# Started as root, Mosquitto would switch to the `mosquitto` user, which cannot read the test's files.
user {user}
persistence false
log_dest stdout

listener {port} 127.0.0.1

# TLS 1.1 allowed, no client certificate required, a server certificate that expires in 5 days.
listener {tls_port} 127.0.0.1
certfile {dir}/server.crt
keyfile {dir}/server.key
tls_version tlsv1.1
ciphers ALL:@SECLEVEL=0
"""

# A broker with anonymous access, no ACL, a plain listener, no size limit and that TLS listener fails every check:
# each one is a weakness it was built with (a new check this broker should pass must say so here).
WEAK_FAILS = set(checks.CHECKS)


def _weak_certificates(directory: Path, *, days: int) -> None:
    """A CA and a server certificate for 127.0.0.1 that expires in ``days`` days."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "weak test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .sign(ca_key, hashes.SHA256())
    )
    (directory / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (directory / "server.crt").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    (directory / "server.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


@pytest.fixture
def weak_broker(tmp_path):
    port, tls_port = free_port(), free_port()
    _weak_certificates(tmp_path, days=5)
    (tmp_path / "mosquitto.conf").write_text(
        WEAK_CONFIG.format(port=port, tls_port=tls_port, dir=tmp_path, user=getpass.getuser())
    )
    server = MosquittoServer(tmp_path, port).start()
    wait_for_port(tls_port)
    server.tls_port = tls_port
    server.ca_file = str(tmp_path / "ca.crt")
    yield server
    server.stop()


def _weak_target(broker):
    return posture.posture_target_external(
        host="127.0.0.1",
        port=broker.port,
        tls_port=broker.tls_port,
        ca_file=broker.ca_file,
        certificates_expected=True,
    )


def _statuses(report):
    return {f["id"]: f["status"] for f in report.findings}


@pytest.mark.integration
def test_a_weak_broker_fails_exactly_the_checks_it_should(db, weak_broker):
    report = posture.posture_run_now(target=_weak_target(weak_broker), actor_label="test")
    statuses = _statuses(report)
    assert {k for k, v in statuses.items() if v == FAIL} == WEAK_FAILS, report.findings
    assert set(statuses) == set(checks.CHECKS)
    assert report.duration_ms < 20_000
    findings = {f["id"]: f for f in report.findings}
    # Evidence says what was sent and what came back.
    assert "anonymous" in findings["wildcard_hash"]["evidence"]["identity"]
    assert findings["wildcard_hash"]["evidence"]["canaries_delivered"]
    assert findings["device_publish_other"]["evidence"]["puback_reason"]
    assert findings["oversize_publish"]["evidence"]["delivered"] is True
    assert all(t.startswith("$SYS/broker/") for t in findings["wildcard_sys"]["evidence"]["delivered_topics"])
    # The check collects what arrived by the first message: how many more came by then is timing (2 under CI load).
    assert findings["wildcard_sys"]["evidence"]["delivered_count"] >= 1
    tls = findings["tls_old_versions"]["evidence"]["received"]
    assert tls["TLSv1.1"].startswith("accepted") and tls["TLSv1.0"].startswith("refused")  # Mosquitto 2 has no 1.0
    assert 4 < findings["tls_certificate_expiry"]["evidence"]["days_left"] < 5.1
    assert findings["tls_certificate_expiry"]["evidence"]["verified_against_ca"] == "yes"
    assert findings["tls_client_certificate"]["evidence"]["received"].startswith("accepted")
    # Another broker's weaknesses are not this fleet's alerts.
    assert not Alert.objects.filter(kind=posture.ALERT_KIND).exists()


@pytest.mark.integration
def test_a_failed_critical_check_on_the_managed_broker_is_one_alert_per_check(db, weak_broker):
    """The console's target pointed at the weak broker (its identities are refused there, anonymous is not)."""
    from django.test import override_settings

    with override_settings(MQTT_PORT=weak_broker.port, MQTT_TLS_PORT=weak_broker.tls_port):
        target = posture.posture_target_managed()
        target.device = None  # the probe does not exist on this broker: the audit acts as anonymous
        for _ in range(2):
            posture.posture_run_now(target=target, trigger=PostureReport.Trigger.SCHEDULE, actor_label="test")
    alerts = Alert.objects.filter(kind=posture.ALERT_KIND)
    assert sorted(a.subject for a in alerts) == ["anonymous_connect", "default_credentials", "device_publish_other"]
    assert all(a.occurrences == 2 and a.severity == "critical" for a in alerts)
    assert "fix" in alerts[0].evidence


@pytest.mark.integration
def test_the_command_prints_json_that_parses(db, weak_broker):
    out = io.StringIO()
    with pytest.raises(SystemExit) as exited:
        call_command(
            "posture_audit",
            "--host=127.0.0.1",
            f"--port={weak_broker.port}",
            f"--tls-port={weak_broker.tls_port}",
            "--expect-client-certificates",
            "--json",
            stdout=out,
        )
    assert exited.value.code == 2  # a critical check failed
    data = json.loads(out.getvalue())
    assert data["summary"]["fail"] == len(WEAK_FAILS)
    assert {f["id"] for f in data["findings"]} == set(checks.CHECKS)


def test_the_command_has_help(capsys):
    from django.core.management import ManagementUtility

    with pytest.raises(SystemExit):
        ManagementUtility(["manage.py", "posture_audit", "--help"]).execute()
    out = capsys.readouterr().out
    assert "--tls-port" in out and "attacker" in out


# --- the project's own rendered broker --------------------------------------------------------------------------------

# The rendered broker passes everything but: the plain listener devices use (MQTT_PLAIN_LISTENER defaults to on, for
# password devices), and reading another device's tx topics, which no console identity can publish to (so there is no
# canary to watch).
OWN_NOT_PASS = {"plain_listener": FAIL, "device_read_other_tx": UNKNOWN}


@pytest.mark.integration
def test_the_projects_rendered_broker_passes_every_check_but_the_explained_ones(db, mosquitto):
    from django.conf import settings

    wait_for_port(settings.MQTT_TLS_PORT)
    report = posture.posture_run_now(target=posture.posture_target_managed(), actor_label="test")
    statuses = _statuses(report)
    not_pass = {k: v for k, v in statuses.items() if v != PASS}
    assert not_pass == OWN_NOT_PASS, [f for f in report.findings if f["status"] != PASS]

    findings = {f["id"]: f for f in report.findings}
    # Judged by delivery: the canaries were not delivered and the probe's own control message was.
    for check_id in ("wildcard_hash", "wildcard_plus", "device_read_other_rx", "retained_readable"):
        evidence = findings[check_id]["evidence"]
        assert evidence["control"]["delivered"] and not evidence["canaries_delivered"], (check_id, evidence)
        assert evidence["suback"][0] == 1  # Mosquitto granted '#' at SUBACK: the grant proves nothing
    assert set(findings["device_publish_other"]["evidence"]["puback_reason"].values()) == {"0x87"}
    assert findings["oversize_publish"]["evidence"]["broker_maximum_packet_size"] == settings.MQTT_MAX_PACKET_SIZE
    assert findings["oversize_publish"]["evidence"]["disconnected"].startswith("yes")
    assert findings["tls_certificate_expiry"]["evidence"]["verified_against_ca"] == "yes"
    assert report.duration_ms < 20_000
    assert not Alert.objects.filter(kind=posture.ALERT_KIND).exists()
    # The retained canary was cleared: nothing of the audit stays on the broker.
    assert "fleetkeeper-posture-audit" not in (Path(settings.MQTT_BROKER_DIR) / "mosquitto.log").read_text()


@pytest.mark.integration
def test_the_api_and_the_page_show_the_findings(db, weak_broker, operator, auditor):
    from rest_framework.authtoken.models import Token

    target = _weak_target(weak_broker)
    first = posture.posture_run_now(target=target, actor_label="test")
    first.findings = [dict(f, status=PASS) if f["id"] == "wildcard_hash" else f for f in first.findings]
    first.save()
    report = posture.posture_run_now(target=target, actor_label="test")

    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=auditor).key}")
    data = api.get("/api/v1/posture/").json()
    assert data["latest"]["id"] == report.pk
    assert {f["id"] for f in data["latest"]["findings"] if f["status"] == FAIL} == WEAK_FAILS
    assert [c["id"] for c in data["changes"]] == ["wildcard_hash"]
    history = api.get(data["history"]).json()
    assert [r["id"] for r in history][:2] == [report.pk, first.pk]

    from django.test import Client

    browser = Client()
    browser.force_login(operator)
    page = browser.get(reverse("posture")).content.decode()
    assert 'data-check="anonymous_connect" data-status="fail"' in page
    assert "How to fix:" in page and "Run now" in page
    assert "wildcard_hash" in page.split('id="posture-changes"')[1]
    card = browser.get(reverse("posture-overview-card")).content.decode()
    assert f'data-count="fail">{len(WEAK_FAILS)}<' in card
    overview = browser.get(reverse("overview")).content.decode()
    assert reverse("posture-overview-card") in overview


def test_run_now_is_audited_and_one_at_a_time(db, operator, support, django_capture_on_commit_callbacks):
    from django.test import Client

    browser = Client()
    browser.force_login(operator)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = browser.post(reverse("posture-run"))
        assert response.status_code == 302
        browser.post(reverse("posture-run"))  # the first is still queued: no second run
    assert PostureReport.objects.count() == 1 and len(callbacks) == 1
    event = AuditEvent.objects.get(action="posture.run_requested")
    assert event.actor == operator
    report = PostureReport.objects.get()
    progress = browser.get(reverse("posture-progress", args=[report.pk])).content.decode()
    assert "queued" in progress and "hx-trigger" in progress
    # A run no worker finished is marked failed when the next one is asked for.
    PostureReport.objects.filter(pk=report.pk).update(created=report.created - timezone.timedelta(minutes=10))
    with django_capture_on_commit_callbacks(execute=False):
        browser.post(reverse("posture-run"))
    report.refresh_from_db()
    assert report.state == "failed" and "No worker finished" in report.error
    assert PostureReport.objects.filter(state="queued").count() == 1
    browser.force_login(support)
    assert browser.post(reverse("posture-run")).status_code == 403
    assert browser.get(reverse("posture")).status_code == 200


# --- the task on a real worker ----------------------------------------------------------------------------------------


@pytest.fixture
def roles_present(transactional_db):
    from django.apps import apps

    from security.roles import roles_sync

    roles_sync(apps)


@pytest.mark.integration
def test_run_now_through_the_api_runs_on_the_worker_with_progress(roles_present, mosquitto, celery_worker, operator):
    from rest_framework.authtoken.models import Token

    from security.posture.wire import wait_until

    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=operator).key}")
    response = api.post("/api/v1/posture/run/")
    assert response.status_code == 202, response.content
    report_id = response.json()["id"]
    seen_progress = set()

    def finished():
        running = api.get("/api/v1/posture/").json()["running"]
        if running:
            seen_progress.add(running["progress"].get("done"))
        return PostureReport.objects.get(pk=report_id).state in ("done", "failed")

    assert wait_until(finished, timeout=90, step=0.1), celery_worker.log()[-3000:]
    report = PostureReport.objects.get(pk=report_id)
    assert report.state == "done" and report.trigger == "api" and report.actor == operator
    assert {k: v for k, v in _statuses(report).items() if v != PASS} == OWN_NOT_PASS, report.findings
    assert len(seen_progress) >= 2, seen_progress  # the page saw it move while it ran
    assert AuditEvent.objects.filter(action="posture.completed", object_id=str(report_id)).exists()


# --- the audit does not set off the console's own detectors ----------------------------------------------------------


@pytest.fixture
def detection_worker(roles_present):
    from django.db import connection

    from tests.support.servers import CeleryWorker

    env = {
        "DETECTION_CONSUMER_ENABLED": "1",
        "DETECTION_RECONNECT_MAX_SECONDS": "1",
        "DETECTION_FLUSH_SECONDS": "0.2",
        "DETECTION_AUTH_FAILURES_BRUTE_FORCE": "4",  # below the audit's six refused logins
        "DETECTION_PROBE_HOLD_SECONDS": "1.5",
    }
    worker = CeleryWorker(
        db_name=str(connection.settings_dict["NAME"]), extra_env=env, queues="posture-detection-tests"
    ).start()
    yield worker
    worker.stop()


@pytest.mark.integration
@pytest.mark.slow
def test_auditing_the_managed_broker_raises_no_detection_alert(mosquitto, detection_worker):
    assert mosquitto.wait_for_log("fleetkeeper-monitor 0 $SYS/broker/log/#", timeout=20), detection_worker.log()[-2000:]
    report = posture.posture_run_now(target=posture.posture_target_managed(), actor_label="test")
    assert report.summary["fail"] == 1  # the plain listener (OWN_NOT_PASS)
    # The refusals are held 1.5 s before they count; give the monitor time past that to have decided.
    refusals = mosquitto.log().count("not authorised")
    assert refusals >= 6
    assert refusals_judged(mosquitto, 0, hold_seconds=1.5), "the broker kept refusing logins"
    assert list(Alert.objects.values_list("kind", "subject")) == []
    # The monitor was watching: the same six refusals without the probe logging in afterwards are an alert.
    from django.conf import settings

    from security.posture.wire import AuditClient, Identity, wait_until

    for n in range(6):
        client = AuditClient("127.0.0.1", settings.MQTT_PORT, Identity("x", "admin", f"guess{n}"), client_id=f"x{n}")
        assert client.connect(3) == 0x87
        client.close()
    assert wait_until(lambda: Alert.objects.filter(kind="auth_failures").exists(), 15), detection_worker.log()[-2000:]
