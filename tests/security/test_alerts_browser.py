"""Alerts in a real browser (Debian's Chromium, Playwright) against a live server: the list with its filters and
its live refresh (a new alert appears without a reload), the detail with its evidence and the device link,
acknowledge and resolve with a comment (state shown, audit written), and the overview's open alerts by severity and
chart of alerts over time. Screenshots go to tests/artifacts/."""

import os
from datetime import timedelta

import pytest

os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"  # see tests/test_browser.py
os.environ.setdefault("DJANGO_LIVE_TEST_SERVER_ADDRESS", "127.0.0.1")

from django.utils import timezone  # noqa: E402
from playwright.sync_api import expect, sync_playwright  # noqa: E402

from security.audit import audit_context  # noqa: E402
from security.detection.alerts import alert_raise  # noqa: E402
from security.models import Alert, AuditEvent  # noqa: E402
from tests.factories import PASSWORD, DeviceFactory  # noqa: E402
from tests.test_browser import ARTIFACTS, CHROMIUM_ARGS  # noqa: E402

pytestmark = [pytest.mark.browser]


@pytest.fixture
def roles_present(transactional_db):
    from django.apps import apps

    from security.roles import roles_sync

    roles_sync(apps)


@pytest.fixture
def page():
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(15_000)
        page.requested_urls = []
        page.on("request", lambda request: page.requested_urls.append(request.url))
        try:
            yield page
        finally:
            browser.close()
    from fleet.celery import app

    app.control.purge()  # the notification tasks the raised alerts queued must not run in another test


def raise_alert(**kwargs):
    with audit_context(service="detection"):
        alert, _ = alert_raise(**kwargs)
    return alert


def log_in(page, base, user):
    page.goto(f"{base}/accounts/login/")
    page.get_by_label("Username").fill(user.username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(lambda url: "/accounts/login/" not in url)


def test_alert_list_detail_acknowledge_resolve_and_the_overview(live_server, roles_present, page):
    from tests.conftest import make_user

    support = make_user("support", "support-browser")
    base = live_server.url
    thief = DeviceFactory(client_id="device-alarm1")
    raise_alert(
        kind="subscription_violation",
        subject=thief.client_id,
        client_id=thief.client_id,
        device=thief,
        summary=f"{thief.client_id} subscribed to '#' (a wildcard)",
        evidence={"counts": {"subscriptions": 1}, "samples": [{"filter": "#", "why": "wildcard"}]},
    )
    raise_alert(
        kind="auth_failures",
        subject="10.9.8.7",
        severity="high",
        summary="12 failed logins from 10.9.8.7 in 60 s",
        evidence={"counts": {"failures": 12}, "source_address": "10.9.8.7", "brute_force": True},
    )
    raise_alert(
        kind="value_out_of_range",
        subject=f"{thief.client_id}:temperature",
        client_id=thief.client_id,
        device=thief,
        summary="temperature 99.9 outside its learned range",
        evidence={"counts": {"readings": 1}},
    )

    log_in(page, base, support)
    page.goto(f"{base}/alerts/")
    rows = page.locator("#alerts tbody tr")
    expect(rows).to_have_count(3)

    # Filters: severity high shows the two high alerts only; the filter survives the live refresh.
    page.locator("#id_severity").select_option("high")
    page.get_by_role("button", name="Filter").click()
    expect(rows).to_have_count(2)
    expect(page.locator("#alerts")).not_to_contain_text("temperature 99.9")
    page.locator("#id_kind").select_option("auth_failures")
    page.get_by_role("button", name="Filter").click()
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("10.9.8.7")
    page.get_by_role("link", name="Clear").click()
    expect(rows).to_have_count(3)

    # Live refresh: an alert raised now appears without a reload (the page's own state survives).
    page.evaluate("window.__not_reloaded = true")
    raise_alert(
        kind="rate_anomaly",
        subject=thief.client_id,
        client_id=thief.client_id,
        device=thief,
        summary=f"{thief.client_id} sent 900 messages in 10 s (usual 40)",
        evidence={"counts": {"messages": 900}},
    )
    expect(rows).to_have_count(4, timeout=15_000)
    expect(page.locator("#alerts")).to_contain_text("sent 900 messages")
    assert page.evaluate("window.__not_reloaded") is True
    page.screenshot(path=str(ARTIFACTS / "alerts-list.png"), full_page=True)

    # Detail: evidence and the link to the device.
    page.get_by_role("link", name=f"{thief.client_id} subscribed to '#' (a wildcard)").click()
    expect(page.get_by_role("heading", name=f"{thief.client_id} subscribed to '#' (a wildcard)")).to_be_visible()
    evidence = page.locator("#alert-evidence")
    expect(evidence).to_contain_text('"filter": "#"')
    expect(evidence).to_contain_text('"why": "wildcard"')
    device_link = page.locator("dl.props").get_by_role("link", name=thief.client_id)
    assert device_link.get_attribute("href") == f"/devices/{thief.client_id}/"
    alert = Alert.objects.get(kind="subscription_violation")
    page.screenshot(path=str(ARTIFACTS / "alert-detail.png"), full_page=True)

    # Acknowledge with a comment: the state and the comment are shown, the audit log has it.
    page.locator("#ack-comment").fill("Looking at the device's logs")
    page.get_by_role("button", name="Acknowledge").click()
    expect(page.locator(".sub")).to_contain_text("Acknowledged")
    expect(page.locator("dl.props")).to_contain_text("Looking at the device's logs")
    expect(page.locator("dl.props")).to_contain_text(support.username)
    expect(page.get_by_role("button", name="Acknowledge")).to_have_count(0)
    ack = AuditEvent.objects.get(action="alert.acknowledged", object_id=str(alert.pk))
    assert ack.actor == support and ack.after == {"state": "acknowledged", "comment": "Looking at the device's logs"}

    # Resolve with a comment.
    page.locator("#resolve-comment").fill("Credential rotated, firmware patched")
    page.get_by_role("button", name="Resolve").click()
    expect(page.locator(".sub")).to_contain_text("Resolved")
    expect(page.locator("dl.props")).to_contain_text("Credential rotated, firmware patched")
    expect(page.get_by_text("Resolved. A new event of this kind opens a new alert.")).to_be_visible()
    resolved = AuditEvent.objects.get(action="alert.resolved", object_id=str(alert.pk))
    assert resolved.actor == support and resolved.after["comment"] == "Credential rotated, firmware patched"
    alert.refresh_from_db()
    assert (alert.state, alert.resolved_by, alert.acknowledged_by) == ("resolved", support, support)
    page.screenshot(path=str(ARTIFACTS / "alert-resolved.png"), full_page=True)

    # The device link leads to the device's page.
    page.locator("dl.props").get_by_role("link", name=thief.client_id).click()
    expect(page).to_have_url(f"{base}/devices/{thief.client_id}/")

    # The resolved alert left the default list (unresolved only); "show all" has it.
    page.goto(f"{base}/alerts/")
    expect(rows).to_have_count(3)
    page.goto(f"{base}/alerts/?all=1")
    expect(rows).to_have_count(4)

    # Overview: open alerts by severity (resolved ones not counted) and the chart of alerts opened per hour; the
    # failed logins were first seen five hours ago.
    Alert.objects.filter(kind="auth_failures").update(first_seen=timezone.now() - timedelta(hours=5))
    page.goto(f"{base}/")
    card = page.locator("#alerts-card")
    expect(card.locator("#alert-chart")).to_be_visible()
    counts = {
        link.get_attribute("href").split("severity=")[1]: link.inner_text().split()[-1]
        for link in card.locator("a[href*='severity=']").all()
    }
    assert counts["high"] == "1" and counts["medium"] == "1" and counts["low"] == "1", counts
    assert "4 in all" in card.locator("#alert-chart").get_attribute("aria-label")
    bars = [title.split(": ")[-1] for title in card.locator("#alert-chart rect title").all_text_contents()]
    nonzero = {i: n for i, n in enumerate(bars) if n != "0"}
    assert len(bars) == 24 and sorted(nonzero.values()) == ["1", "3"], bars
    older, newer = sorted(nonzero)
    assert (nonzero[older], nonzero[newer], newer - older) == ("1", "3", 5), bars  # five hours apart
    expect(card).to_contain_text("Alerts opened per hour, last 24 hours (4 in all")
    page.screenshot(path=str(ARTIFACTS / "overview-alerts.png"), full_page=True)

    # A second subscription event updates nothing resolved: it opens a new alert (and the list refreshes to it).
    raise_alert(
        kind="subscription_violation",
        subject=thief.client_id,
        client_id=thief.client_id,
        device=thief,
        summary=f"{thief.client_id} subscribed to '+/#' (a wildcard)",
        evidence={"counts": {"subscriptions": 1}, "samples": [{"filter": "+/#", "why": "wildcard"}]},
    )
    assert Alert.objects.filter(kind="subscription_violation").count() == 2
    assert all(url.startswith(base) for url in page.requested_urls), [
        u for u in page.requested_urls if not u.startswith(base)
    ]
