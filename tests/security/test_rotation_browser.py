"""Rotation in a real browser: the device page's "Rotate credentials…" with its confirmation, the history that htmx
loads into the page, the overview card, and the policy page. Screenshots go to tests/artifacts/."""

import pytest
from playwright.sync_api import expect

from security import services
from security.models import CredentialRotation
from tests import test_browser
from tests.factories import PASSWORD, DeviceFactory
from tests.test_browser import ARTIFACTS

chromium = test_browser.browser_page  # the Chromium page fixture, here under the name "chromium"

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_an_operator_rotates_a_device_from_its_page_and_sees_the_steps(live_server, chromium, user_with_role):
    from django.apps import apps

    from security.roles import roles_sync

    roles_sync(apps)  # a transactional test before this one may have flushed the groups
    operator = user_with_role("operator")
    device = DeviceFactory(client_id="device-browser-rot")
    services.credential_issue(actor=operator, device=device)
    page, base = chromium, live_server.url
    page.goto(f"{base}/accounts/login/?next=/devices/device-browser-rot/")
    page.get_by_label("Username").fill(operator.username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()

    section = page.locator("#device-rotations")
    expect(section.get_by_text("never been rotated")).to_be_visible()
    section.get_by_role("link", name="Rotate credentials…").click()
    expect(page.get_by_role("heading", name="Rotate the credentials of device-browser-rot?")).to_be_visible()
    page.get_by_role("button", name="Rotate credentials").click()
    expect(page.locator("#id_confirm")).to_be_visible()  # not confirmed: asked again
    assert not CredentialRotation.objects.exists()
    page.locator("#id_confirm").check()
    page.get_by_role("button", name="Rotate credentials").click()
    expect(page).to_have_url(f"{base}/devices/device-browser-rot/")
    row = CredentialRotation.objects.get(client_id="device-browser-rot")
    history = page.locator("#rotation-history")
    expect(history.get_by_text("Pending delivery")).to_be_visible()
    expect(history.get_by_text("manual, by operator-user")).to_be_visible()
    expect(section.get_by_role("button", name=f"Cancel rotation #{row.pk}")).to_be_visible()
    page.screenshot(path=str(ARTIFACTS / "rotation-device.png"), full_page=True)

    page.goto(f"{base}/")
    expect(page.locator("#rotation-card [data-count=pending]")).to_have_text("1")
    page.goto(f"{base}/rotations/policies/")
    policy_row = page.locator("#policy-table tr[data-policy]")
    expect(policy_row).to_have_count(1)
    expect(policy_row).to_contain_text("every hour")
    page.screenshot(path=str(ARTIFACTS / "rotation-policies.png"), full_page=True)
    assert not page.console_errors
    assert all(url.startswith(base) for url in page.requested_urls)
