"""The posture page in a real browser (Debian's Chromium, Playwright) against a live server, a real worker and the
project's rendered Mosquitto: "Run now" shows the progress while the worker audits, the page reloads into the report
grouped by severity with expandable evidence and how to fix, and the overview shows the posture card. Screenshots go
to tests/artifacts/."""

import os

import pytest

os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"  # see tests/test_browser.py
os.environ.setdefault("DJANGO_LIVE_TEST_SERVER_ADDRESS", "127.0.0.1")

from playwright.sync_api import expect, sync_playwright  # noqa: E402

from security.models import PostureReport  # noqa: E402
from tests.security.test_alerts_browser import log_in  # noqa: E402
from tests.test_browser import ARTIFACTS, CHROMIUM_ARGS  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.integration]


@pytest.fixture
def roles_present(transactional_db):
    from django.apps import apps

    from security.roles import roles_sync

    roles_sync(apps)


def test_run_now_shows_progress_then_the_report_and_the_overview_card(
    live_server, roles_present, mosquitto, celery_worker
):
    from tests.conftest import make_user

    operator = make_user("operator", "operator-posture")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(60_000)
        try:
            log_in(page, live_server.url, operator)
            page.get_by_role("link", name="Posture", exact=True).click()
            expect(page.get_by_text("No posture audit has run yet")).to_be_visible()
            page.get_by_role("button", name="Run now").click()
            expect(page.locator("#posture-progress")).to_be_visible()  # queued or running, polled every second
            # When the worker is done the fragment asks htmx to reload: the report replaces the progress.
            expect(page.locator("#posture-report")).to_be_visible(timeout=60_000)
            expect(page.locator("#posture-progress")).to_have_count(0)
            report = PostureReport.objects.get()
            assert report.state == "done"
            row = page.locator('tr[data-check="plain_listener"]')
            expect(row).to_contain_text("fail")
            expect(row).to_contain_text("How to fix:")
            row.get_by_text("Evidence (what was sent, what came back)").click()
            expect(row.locator("pre")).to_contain_text("plain-text CONNECT")
            expect(page.locator('tr[data-check="wildcard_hash"]')).to_contain_text("pass")
            expect(page.locator('tr[data-check="device_read_other_tx"]')).to_contain_text("unknown")
            expect(page.locator("#posture-history")).to_contain_text(str(report.pk))
            page.screenshot(path=str(ARTIFACTS / "posture-report.png"), full_page=True)
            page.get_by_role("link", name="Overview", exact=True).click()
            expect(page.locator('#posture-card [data-count="fail"]')).to_have_text("1")
            page.screenshot(path=str(ARTIFACTS / "posture-overview-card.png"))
        finally:
            browser.close()
