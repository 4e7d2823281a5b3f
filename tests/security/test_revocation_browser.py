"""Revoke from the device page and bulk-revoke from the device list in a real browser, with a real worker and a
real Mosquitto: the panel says "revocation pending" and then, without a reload, "verified refused at ..."."""

import os

import pytest

os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"  # see tests/test_browser.py
os.environ.setdefault("DJANGO_LIVE_TEST_SERVER_ADDRESS", "127.0.0.1")

from playwright.sync_api import expect, sync_playwright  # noqa: E402

from devices.models import Device  # noqa: E402
from security import services  # noqa: E402
from security.models import DeviceAction, EnforcementChange  # noqa: E402
from tests.factories import PASSWORD, DeviceFactory, DeviceModelFactory  # noqa: E402
from tests.support.broker import MqttClient, raw_connect_code  # noqa: E402
from tests.support.waiting import wait_until
from tests.test_browser import ARTIFACTS, CHROMIUM_ARGS  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.integration, pytest.mark.slow]


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
        try:
            yield page
        finally:
            browser.close()


def test_revoke_from_the_device_page_and_bulk_from_the_list(
    live_server, roles_present, celery_worker, mosquitto, operator, support, page
):
    model = DeviceModelFactory(name="Batch-9")
    secrets_by_id = {}
    for client_id in ("device-web1", "device-web2", "device-web3"):
        device = DeviceFactory(client_id=client_id, model=model)
        secrets_by_id[client_id] = services.credential_issue(actor=operator, device=device).password
    assert wait_until(lambda: not EnforcementChange.objects.exclude(state="applied").exists(), timeout=20.0), (
        celery_worker.log()[-2000:]
    )
    session = MqttClient(
        mosquitto.port, client_id="device-web1", username="device-web1", password=secrets_by_id["device-web1"]
    )
    assert session.connect() == 0
    base = live_server.url
    page.goto(f"{base}/accounts/login/?next=/devices/device-web1/")
    page.get_by_label("Username").fill(support.username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(f"{base}/devices/device-web1/")

    page.get_by_role("link", name="Revoke…").click()
    page.get_by_label("Reason").fill("seen on a paste site")
    page.get_by_label("I have checked that this is the right device.").check()
    page.get_by_role("button", name="Revoke device").click()
    expect(page).to_have_url(f"{base}/devices/device-web1/")
    # The panel polls itself until the verifier has proven the refusal.
    expect(page.locator("#device-action-state")).to_contain_text("verified refused at", timeout=15_000)
    expect(page.locator("#device-action-state")).to_contain_text("seen on a paste site")
    page.screenshot(path=str(ARTIFACTS / "revocation-verified.png"), full_page=True)
    assert session.wait_disconnected(timeout=2)
    session.close()

    # Bulk: the list's filters travel to the bulk page; the typed count confirms; the job page shows progress.
    page.goto(f"{base}/devices/?model=Batch-9")
    page.get_by_role("link", name="Bulk revoke / quarantine…").click()
    expect(page.locator("#bulk-preview")).to_contain_text("2 of them will be revoked")
    page.get_by_label("Reason").fill("batch 9 recalled")
    page.get_by_label("Type the number of devices to confirm").fill("2")
    page.get_by_role("button", name="Revoke 2 devices").click()
    expect(page.locator("#bulk-status")).to_have_attribute("data-settled", "true", timeout=20_000)
    expect(page.locator("#bulk-verified")).to_have_text("2")
    page.screenshot(path=str(ARTIFACTS / "bulk-revocation.png"), full_page=True)
    assert set(Device.objects.filter(model=model).values_list("status", flat=True)) == {"revoked"}
    assert DeviceAction.objects.filter(state="verified").count() == 3
    for client_id, secret in secrets_by_id.items():
        assert raw_connect_code(mosquitto.port, client_id=client_id, username=client_id, password=secret) != 0
