"""Payload keys in a real browser: the device page's card (loaded by htmx), issuing a key shown once, and the card
afterwards showing only its id. Screenshots go to tests/artifacts/."""

import pytest
from playwright.sync_api import expect

from security.models import PayloadKey
from tests import test_browser
from tests.factories import PASSWORD, DeviceFactory
from tests.test_browser import ARTIFACTS

chromium = test_browser.browser_page  # the Chromium page fixture, here under the name "chromium"

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_an_operator_issues_a_payload_key_and_sees_it_once(live_server, chromium, user_with_role):
    from django.apps import apps

    from security.roles import roles_sync

    roles_sync(apps)  # a transactional test before this one may have flushed the groups
    operator = user_with_role("operator")
    DeviceFactory(client_id="device-browser-pk")
    page, base = chromium, live_server.url
    page.goto(f"{base}/accounts/login/?next=/devices/device-browser-pk/")
    page.get_by_label("Username").fill(operator.username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()

    card = page.locator("#device-payload-key")
    expect(card.get_by_text("No payload key")).to_be_visible()
    card.get_by_role("button", name="Issue a payload key").click()
    expect(page.get_by_role("heading", name="Payload key for device-browser-pk")).to_be_visible()
    shown = page.locator("#payload-key").text_content()
    row = PayloadKey.objects.get(client_id="device-browser-pk")
    assert shown.startswith("fkpk1.") and page.locator("#issued-key-id").text_content() == row.key_id
    page.screenshot(path=str(ARTIFACTS / "payload-key-issued.png"), full_page=True)

    page.get_by_role("link", name="Back to the device").click()
    expect(card.locator("#payload-key-id")).to_have_text(row.key_id)
    assert shown not in page.content()
    page.reload()
    expect(card.locator("#payload-key-id")).to_have_text(row.key_id)
    assert shown not in page.content()
    # Re-issuing asks first (the old key stops working at once).
    page.once("dialog", lambda dialog: dialog.dismiss())
    card.get_by_role("button", name="Issue a new payload key…").click()
    assert PayloadKey.objects.filter(client_id="device-browser-pk").count() == 1
    page.screenshot(path=str(ARTIFACTS / "payload-key-card.png"), full_page=True)
    assert not page.console_errors
    assert all(url.startswith(base) for url in page.requested_urls)
