"""The console in a real browser: Debian's Chromium driven by Playwright against a live test server.

Log in, add a device through the form, find it with the live search, save screenshots under
tests/artifacts/, and check that no page tried to load anything from outside 127.0.0.1.
"""

import os
from pathlib import Path
from urllib.parse import urlsplit

import pytest

# Playwright's sync API runs an asyncio event loop in the test's thread. Django's async-safety check
# sees that loop and refuses every ORM call from this thread (SynchronousOnlyOperation), including the
# ones pytest-django makes to set up and flush the database. Nothing here is concurrent: ORM calls
# happen between Playwright calls, never inside the loop, so the check guards against nothing here.
os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
# The live server listens on 127.0.0.1 (not "localhost", which may be ::1), the one host pages may load from.
os.environ.setdefault("DJANGO_LIVE_TEST_SERVER_ADDRESS", "127.0.0.1")

from playwright.sync_api import expect, sync_playwright  # noqa: E402

from devices.models import Device  # noqa: E402
from security.models import AuditEvent  # noqa: E402
from tests.factories import PASSWORD, DeviceFactory, DeviceGroupFactory, DeviceModelFactory  # noqa: E402

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture
def browser_page():
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(10_000)
        page.requested_urls = []
        page.console_errors = []
        page.on("request", lambda request: page.requested_urls.append(request.url))
        page.on("console", lambda msg: msg.type == "error" and page.console_errors.append(msg.text))
        try:
            yield page
        finally:
            browser.close()


@pytest.fixture
def fleet(live_server, user_with_role):
    operator = user_with_role("operator")
    DeviceModelFactory(name="Thermo-1")
    DeviceGroupFactory(name="north")
    for n in range(3):
        DeviceFactory(client_id=f"device-other-{n}", name=f"Other {n}")
    return operator


@pytest.mark.browser
def test_log_in_add_a_device_and_find_it(live_server, fleet, browser_page):
    page = browser_page
    base = live_server.url
    assert urlsplit(base).hostname == "127.0.0.1"

    page.goto(f"{base}/")
    expect(page).to_have_url(f"{base}/accounts/login/?next=/")
    page.get_by_label("Username").fill(fleet.username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(f"{base}/")
    expect(page.get_by_role("heading", name="Fleet overview")).to_be_visible()
    assert page.evaluate("typeof window.htmx") == "object"  # served from static/vendor/, not a CDN
    page.screenshot(path=str(ARTIFACTS / "overview.png"), full_page=True)

    page.get_by_role("link", name="Add device").first.click()
    page.get_by_label("Client id").fill("device-browser-1")
    page.get_by_label("Name").fill("Greenhouse sensor")
    page.get_by_label("Model").select_option(label="Thermo-1")
    page.get_by_label("north").check()
    page.get_by_label("MAC address").fill("00:1A:2B:3C:4D:5E")
    page.screenshot(path=str(ARTIFACTS / "device-form.png"), full_page=True)
    page.get_by_role("button", name="Add device").click()
    expect(page).to_have_url(f"{base}/devices/device-browser-1/")
    expect(page.get_by_text("Device device-browser-1 added.")).to_be_visible()
    page.screenshot(path=str(ARTIFACTS / "device-detail.png"), full_page=True)
    device = Device.objects.get(client_id="device-browser-1")
    assert device.mac == "00:1a:2b:3c:4d:5e" and [g.name for g in device.groups.all()] == ["north"]
    assert AuditEvent.objects.filter(action="device.create", object_id="device-browser-1", actor=fleet).exists()

    page.get_by_role("navigation", name="Main").get_by_role("link", name="Devices").click()
    table = page.locator("#devices")
    expect(table.get_by_role("link", name="device-other-0")).to_be_visible()
    page.get_by_placeholder("Search devices…").press_sequentially("greenhouse", delay=30)
    # The live search swaps only the table (htmx) and puts the search in the address bar.
    expect(page).to_have_url(f"{base}/devices/?search=greenhouse")
    expect(table.get_by_role("link", name="device-browser-1")).to_be_visible()
    expect(table.get_by_role("link", name="device-other-0")).to_have_count(0)
    expect(page.get_by_text("1 device matches the filters")).to_be_visible()
    page.screenshot(path=str(ARTIFACTS / "device-search.png"), full_page=True)

    # Sorting keeps the search; the back button returns to the unsorted list.
    page.get_by_role("link", name="Name").click()
    expect(page).to_have_url(f"{base}/devices/?search=greenhouse&ordering=name")
    expect(page.locator("th[aria-sort=ascending]")).to_have_text("Name ▲")
    page.go_back()
    expect(page).to_have_url(f"{base}/devices/?search=greenhouse")
    expect(page.locator("th[aria-sort]")).to_have_count(0)
    expect(page.get_by_placeholder("Search devices…")).to_have_value("greenhouse")

    # The other filters apply on change, together with the search.
    page.get_by_label("Model").select_option(label="Thermo-1")
    expect(page).to_have_url(f"{base}/devices/?search=greenhouse&model=Thermo-1")
    expect(table.get_by_role("link", name="device-browser-1")).to_be_visible()
    page.get_by_label("Last seen").select_option(label="Seen recently")
    expect(page).to_have_url(f"{base}/devices/?search=greenhouse&model=Thermo-1&seen=recent")
    expect(page.get_by_text("No devices match these filters")).to_be_visible()

    outside = [
        url for url in page.requested_urls if urlsplit(url).scheme != "data" and urlsplit(url).hostname != "127.0.0.1"
    ]
    assert outside == [], f"the pages tried to load from outside 127.0.0.1: {outside}"
    assert page.console_errors == []


@pytest.mark.browser
def test_the_secret_shown_once_has_a_copy_button_that_copies_it(live_server, fleet, browser_page):
    page = browser_page
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=live_server.url)
    DeviceFactory(client_id="device-copy-1")
    page.goto(f"{live_server.url}/accounts/login/?next=/devices/device-copy-1/")
    page.get_by_label("Username").fill(fleet.username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.get_by_role("button", name="Issue secret").click()
    secret = page.locator("#device-secret").inner_text()
    assert len(secret) >= 43
    button = page.locator("button[data-copy-target=device-secret]")
    button.click()
    expect(button).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == secret
    assert not page.console_errors
