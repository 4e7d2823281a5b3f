"""Rotation campaigns (issue 7, "Campaigns"): waves, the canary, judging against the baseline, pause/resume/abort,
resuming from the database, the rotation debt. The state machine runs here without a worker (the task only calls
``campaign_advance``); the end-to-end run with a real worker, broker and devices is at the bottom."""

from __future__ import annotations

import datetime as dt
import os
import re
import time

import pytest
from django.core.exceptions import PermissionDenied, ValidationError
from django.utils import timezone

from devices.models import Device
from security.models import AuditEvent, CredentialRotation, DeviceCredential, RotationCampaign, RotationWave
from security.rotation import campaigns
from security.rotation import selectors as campaign_reads
from security.rotation.campaigns import CampaignSettings, campaign_advance
from security.rotation.waves import plan_waves, wave_judge
from tests.factories import DeviceFactory

pytestmark = pytest.mark.django_db


def fleet(n: int, *, prefix: str = "device-camp", online: bool = True, age_days: int = 100) -> list[Device]:
    now = timezone.now()
    rows = [DeviceFactory(client_id=f"{prefix}{i:04d}", last_seen=now if online else None) for i in range(n)]
    DeviceCredential.objects.bulk_create(
        [
            DeviceCredential(device=d, password_hash="$7$1$x$y", issued_at=now - dt.timedelta(days=age_days + i))
            for i, d in enumerate(rows)
        ]
    )
    return rows


def create(operator, *, count: int, filters=None, **options) -> RotationCampaign:
    return campaigns.campaign_create(
        actor=operator,
        name="Q4 rotation",
        filters=filters or {"search": "device-camp"},
        reason="yearly rotation",
        confirm_count=count,
        options=CampaignSettings(**options),
    )


def settle(wave: RotationWave, *, state: str, confirmed: bool = True) -> None:
    now = timezone.now()
    CredentialRotation.objects.filter(wave=wave).update(state=state, confirmed_at=now if confirmed else None)


@pytest.fixture(autouse=True)
def no_enqueue(request, monkeypatch):
    """The state machine is stepped by hand here (no worker), except in the end-to-end tests."""
    calls = []
    if request.node.get_closest_marker("integration"):
        return calls
    monkeypatch.setattr(campaigns, "enqueue", lambda campaign_id, countdown=None: calls.append(campaign_id))
    return calls


# --- pure ---------------------------------------------------------------------------------------------------


def test_waves_are_a_canary_then_equal_waves():
    assert plan_waves(list(range(25)), canary_size=5, wave_size=10) == [
        list(range(5)),
        list(range(5, 15)),
        list(range(15, 25)),
    ]
    assert plan_waves(list(range(3)), canary_size=5, wave_size=10) == [[0, 1, 2]]
    assert plan_waves([], canary_size=5, wave_size=10) == []


def judge(**kwargs):
    values = dict(
        kind="secret",
        started=100,
        confirmed=95,
        reconnected=95,
        online_share=1.0,
        reconnect_baseline=1.0,
        min_confirm_ratio=0.9,
        min_reconnect_ratio=0.9,
        timed_out=False,
    )
    values.update(kwargs)
    return wave_judge(**values)


def test_a_wave_at_the_baseline_passes():
    verdict = judge()
    assert verdict.passed and verdict.reason == ""
    assert verdict.result["confirm_rate"] == 0.95 and verdict.result["reconnect_rate"] == 1.0


def test_a_wave_whose_confirmations_drop_below_the_online_baseline_is_held_with_the_reason():
    verdict = judge(confirmed=40, reconnected=40, online_share=0.5)  # needed 45 %
    assert verdict.passed is False
    assert "40 of 100 devices confirmed (40%)" in verdict.reason and "50%" in verdict.reason
    # The same confirmations pass when fewer devices were online to confirm.
    assert judge(confirmed=40, reconnected=40, online_share=0.4).passed


def test_a_wave_whose_devices_do_not_reconnect_is_held():
    verdict = judge(confirmed=100, reconnected=50, timed_out=True)
    assert verdict.passed is False
    assert "50 of 100 confirmed devices reconnected" in verdict.reason
    assert "after the wave timeout" in verdict.reason


def test_certificate_waves_are_not_judged_on_reconnects():
    verdict = judge(kind="certificate", confirmed=100, reconnected=0)
    assert verdict.passed and verdict.result["reconnect_rate"] is None


def test_a_wave_with_no_device_online_or_nothing_started_passes():
    assert judge(confirmed=0, reconnected=0, online_share=0.0).passed
    assert judge(started=0, confirmed=0, reconnected=0).passed


# --- create -------------------------------------------------------------------------------------------------


def test_preview_counts_only_devices_that_can_rotate(operator):
    fleet(4)
    DeviceFactory(client_id="device-camp-nocred")  # nothing to rotate
    revoked = fleet(1, prefix="device-camp-rev")[0]
    Device.objects.filter(pk=revoked.pk).update(status=Device.Status.REVOKED)
    preview = campaigns.campaign_preview(filters={"search": "device-camp"}, canary_size=2, wave_size=2)
    assert preview["matched"] == 6 and preview["eligible"] == 4 and preview["skipped"] == 2
    assert preview["waves"] == 2 and preview["wave_sizes"] == [2, 2]


def test_create_needs_the_typed_count_and_fixes_devices_and_waves(operator):
    rows = fleet(12)
    with pytest.raises(ValidationError) as error:
        create(operator, count=11, canary_size=2, wave_size=5)
    assert "type 12 to confirm" in str(error.value)
    campaign = create(operator, count="12", canary_size=2, wave_size=5)
    assert campaign.total == 12 and sorted(campaign.device_ids) == sorted(d.pk for d in rows)
    assert [(w.number, w.size) for w in campaign.waves.order_by("number")] == [(0, 2), (1, 5), (2, 5)]
    assert campaign.state == "pending" and campaign.created_by == operator
    event = AuditEvent.objects.get(action="rotation_campaign.create")
    assert event.actor == operator and event.after["devices"] == 12
    # A device added later is not part of it.
    fleet(1, prefix="device-camp-late")
    campaign.refresh_from_db()
    assert campaign.total == 12


def test_create_refuses_bad_input_with_messages_that_say_what_to_do(operator):
    fleet(2)
    with pytest.raises(ValidationError) as error:
        campaigns.campaign_create(
            actor=operator, name="", filters={"search": "device-camp"}, reason="", confirm_count=2
        )
    assert set(error.value.message_dict) == {"name", "reason"}
    with pytest.raises(ValidationError) as error:
        create(operator, count=2, wave_size=0, min_confirm_ratio=2)
    assert set(error.value.message_dict) == {"wave_size", "min_confirm_ratio"}
    with pytest.raises(ValidationError) as error:
        create(operator, count=0, filters={"search": "nothing-matches"})
    assert "No device" in str(error.value)
    with pytest.raises(ValidationError) as error:
        create(operator, count=2, filters={"colour": "red"})
    assert "Unknown filter" in str(error.value)


def test_roles_without_rotate_permission_cannot_create_or_pause(support, auditor, operator):
    fleet(2)
    for user in (support, auditor):
        with pytest.raises(PermissionDenied):
            create(user, count=2)
    campaign = create(operator, count=2)
    with pytest.raises(PermissionDenied):
        campaigns.campaign_pause(actor=support, campaign=campaign)


# --- the state machine --------------------------------------------------------------------------------------


def test_a_campaign_runs_wave_after_wave_and_completes(operator):
    fleet(12)
    campaign = create(operator, count=12, canary_size=2, wave_size=5)
    assert campaign_advance(campaign_id=campaign.pk) is not None
    campaign.refresh_from_db()
    canary = campaign.waves.get(number=0)
    assert campaign.state == "running" and campaign.baseline["reconnect_rate"] == 1.0
    assert canary.state == "running" and canary.result["started"] == 2 and canary.result["online_share"] == 1.0
    rotations = CredentialRotation.objects.filter(campaign=campaign)
    assert rotations.count() == 2 and set(rotations.values_list("trigger", flat=True)) == {"campaign"}
    # Still delivering: the wave waits.
    campaign_advance(campaign_id=campaign.pk)
    assert campaign.waves.get(number=1).state == "pending"
    settle(canary, state="completed")
    campaign_advance(campaign_id=campaign.pk)
    canary.refresh_from_db()
    assert canary.state == "passed" and canary.result["confirm_rate"] == 1.0
    assert campaign.waves.get(number=1).state == "running"
    for number in (1, 2):
        settle(campaign.waves.get(number=number), state="completed")
        campaign_advance(campaign_id=campaign.pk)
    campaign.refresh_from_db()
    assert campaign.state == "completed" and campaign.finished_at is not None
    assert CredentialRotation.objects.filter(campaign=campaign).count() == 12
    assert campaign_advance(campaign_id=campaign.pk) is None
    actions = list(AuditEvent.objects.filter(object_type="rotationcampaign").values_list("action", flat=True))
    assert actions.count("rotation_campaign.wave_passed") == 3 and "rotation_campaign.complete" in actions


def test_a_bad_wave_pauses_the_campaign_with_the_reason_and_resume_goes_on(operator):
    fleet(12)
    campaign = create(operator, count=12, canary_size=2, wave_size=5)
    campaign_advance(campaign_id=campaign.pk)
    settle(campaign.waves.get(number=0), state="completed")
    campaign_advance(campaign_id=campaign.pk)
    wave = campaign.waves.get(number=1)
    # The devices were online, but only one of five confirmed.
    CredentialRotation.objects.filter(wave=wave).update(state="failed")
    CredentialRotation.objects.filter(pk=CredentialRotation.objects.filter(wave=wave).first().pk).update(
        state="completed", confirmed_at=timezone.now()
    )
    assert campaign_advance(campaign_id=campaign.pk) is None
    campaign.refresh_from_db()
    wave.refresh_from_db()
    assert campaign.state == "paused" and wave.state == "held"
    assert campaign.pause_reason.startswith("Wave 1: 1 of 5 devices confirmed (20%)")
    assert campaign.waves.get(number=2).state == "pending"
    # Paused: nothing moves.
    assert campaign_advance(campaign_id=campaign.pk) is None
    assert CredentialRotation.objects.filter(campaign=campaign).count() == 7
    campaigns.campaign_resume(actor=operator, campaign=campaign)
    campaign.refresh_from_db()
    assert campaign.state == "running" and campaign.pause_reason == ""
    campaign_advance(campaign_id=campaign.pk)
    assert campaign.waves.get(number=2).state == "running"
    assert AuditEvent.objects.filter(action="rotation_campaign.resume", actor=operator).exists()


def test_a_wave_is_judged_after_its_timeout_and_offline_devices_do_not_pause_it(operator):
    fleet(4, online=False)
    campaign = create(operator, count=4, canary_size=2, wave_size=2, wave_timeout_seconds=30)
    campaign_advance(campaign_id=campaign.pk)
    canary = campaign.waves.get(number=0)
    CredentialRotation.objects.filter(wave=canary).update(state="delivered")
    campaign_advance(campaign_id=campaign.pk)
    canary.refresh_from_db()
    assert canary.state == "running"
    RotationWave.objects.filter(pk=canary.pk).update(started_at=timezone.now() - dt.timedelta(seconds=31))
    campaign_advance(campaign_id=campaign.pk)
    canary.refresh_from_db()
    assert canary.state == "passed" and canary.result["timed_out"] is True
    assert canary.result["confirm_baseline"] == 0.0


def test_starting_a_wave_again_after_a_crash_rotates_nobody_twice(operator):
    fleet(6)
    campaign = create(operator, count=6, canary_size=3, wave_size=3)
    campaign_advance(campaign_id=campaign.pk)
    canary = campaign.waves.get(number=0)
    # The worker died after the rotations were started, as if the wave's own row had not been saved: the next run
    # starts the wave again. Even with the first rotations finished (no open rotation left to block a second one),
    # the campaign's own record keeps them from being rotated again.
    settle(canary, state="completed")
    RotationWave.objects.filter(pk=canary.pk).update(state="pending", started_at=None)
    campaign_advance(campaign_id=campaign.pk)
    canary.refresh_from_db()
    assert canary.state == "running" and canary.result["started"] == 0 and canary.result["skipped"] == 3
    assert CredentialRotation.objects.filter(campaign=campaign).count() == 3


def test_abort_cancels_what_has_not_switched_and_stops_the_waves(operator):
    fleet(6)
    campaign = create(operator, count=6, canary_size=3, wave_size=3)
    campaign_advance(campaign_id=campaign.pk)
    rows = list(CredentialRotation.objects.filter(campaign=campaign).order_by("pk"))
    CredentialRotation.objects.filter(pk=rows[0].pk).update(state="switched")
    CredentialRotation.objects.filter(pk=rows[1].pk).update(state="confirmed")
    campaigns.campaign_abort(actor=operator, campaign=campaign, reason="bad firmware batch")
    states = dict(CredentialRotation.objects.filter(campaign=campaign).values_list("pk", "state"))
    assert states == {rows[0].pk: "switched", rows[1].pk: "cancelled", rows[2].pk: "cancelled"}
    campaign.refresh_from_db()
    assert campaign.state == "aborted" and "bad firmware batch" in campaign.pause_reason
    assert set(campaign.waves.values_list("state", flat=True)) == {"aborted"}
    assert campaign_advance(campaign_id=campaign.pk) is None
    with pytest.raises(ValidationError):
        campaigns.campaign_resume(actor=operator, campaign=campaign)
    event = AuditEvent.objects.get(action="rotation_campaign.abort")
    assert event.actor == operator and event.after["cancelled_rotations"] == 2


def test_pause_by_an_operator_stops_new_waves(operator):
    fleet(4)
    campaign = create(operator, count=4, canary_size=2, wave_size=2)
    campaign_advance(campaign_id=campaign.pk)
    campaigns.campaign_pause(actor=operator, campaign=campaign, reason="change freeze")
    settle(campaign.waves.get(number=0), state="completed")
    assert campaign_advance(campaign_id=campaign.pk) is None
    campaign.refresh_from_db()
    assert campaign.state == "paused" and "change freeze" in campaign.pause_reason
    assert campaign.waves.get(number=1).state == "pending"
    with pytest.raises(ValidationError):
        campaigns.campaign_pause(actor=operator, campaign=campaign)


def test_stalled_campaigns_are_enqueued_again(operator, no_enqueue):
    fleet(2)
    campaign = create(operator, count=2)
    running = create(operator, count=2)
    RotationCampaign.objects.filter(pk=running.pk).update(state="paused")
    RotationCampaign.objects.filter(pk__in=[campaign.pk, running.pk]).update(
        updated=timezone.now() - dt.timedelta(minutes=5)
    )
    no_enqueue.clear()
    assert campaigns.campaign_resume_stalled(older_than_seconds=60) == 1
    assert no_enqueue == [campaign.pk]


def test_the_periodic_tick_resumes_stalled_campaigns_and_runs_with_the_rotation_tick(operator, no_enqueue, monkeypatch):
    from security.rotation import campaign_tasks, certificates
    from security.rotation import tasks as rotation_tasks

    fleet(2)
    campaign = create(operator, count=2)
    RotationCampaign.objects.filter(pk=campaign.pk).update(updated=timezone.now() - dt.timedelta(minutes=5))
    no_enqueue.clear()
    finished = []
    monkeypatch.setattr(certificates, "certificate_rotations_finish", lambda: finished.append(1) or 0)
    assert campaign_tasks.rotation_campaigns_tick() == {"campaigns_resumed": 1, "certificate_rotations_completed": 0}
    assert no_enqueue == [campaign.pk] and finished == [1]
    # The rotation tick (a django-celery-beat entry) runs it too; a failure there never fails the rotation tick.
    RotationCampaign.objects.filter(pk=campaign.pk).update(updated=timezone.now() - dt.timedelta(minutes=5))
    no_enqueue.clear()
    assert rotation_tasks.rotation_tick()["campaigns"] == {"campaigns_resumed": 1, "certificate_rotations_completed": 0}
    assert no_enqueue == [campaign.pk]
    monkeypatch.setattr(certificates, "certificate_rotations_finish", lambda: 1 / 0)
    assert rotation_tasks.rotation_tick()["campaigns"] == {"error": True}


def test_rotation_debt_lists_devices_on_old_credentials_oldest_first(operator):
    rows = fleet(5)
    campaign = create(operator, count=5)
    DeviceCredential.objects.filter(device=rows[4]).update(issued_at=timezone.now() + dt.timedelta(seconds=1))
    debt = campaign_reads.rotation_debt(campaign, limit=3)
    assert debt["total"] == 4
    assert [row["client_id"] for row in debt["oldest"]] == ["device-camp0003", "device-camp0002", "device-camp0001"]


def test_wave_progress_counts_each_wave_in_two_queries(operator, django_assert_max_num_queries):
    fleet(12)
    campaign = create(operator, count=12, canary_size=2, wave_size=5)
    campaign_advance(campaign_id=campaign.pk)
    with django_assert_max_num_queries(2):
        waves = campaign_reads.campaign_waves(campaign)
    assert [w["size"] for w in waves] == [2, 5, 5] and waves[0]["started"] == 2 and waves[0]["canary"]


# --- pages --------------------------------------------------------------------------------------------------

PAGE_ROLES = ("admin", "operator", "support", "auditor", None)


@pytest.mark.parametrize("role", PAGE_ROLES)
def test_pages_for_every_role(role, user_with_role, client):
    fleet(3)
    campaign = campaigns.campaign_create(
        actor=user_with_role("operator", "campaign-owner"),
        name="pages",
        filters={"search": "device-camp"},
        reason="r",
        confirm_count=3,
    )
    client.force_login(user_with_role(role, f"page-{role}"))  # role None: signed in, no role
    readers = {"admin", "operator", "support", "auditor"}
    writers = {"admin", "operator"}
    for url, allowed in (
        ("/rotation-campaigns/", readers),
        (f"/rotation-campaigns/{campaign.pk}/", readers),
        ("/rotation-campaigns/new/?search=device-camp", writers),
    ):
        response = client.get(url)
        assert response.status_code == (200 if role in allowed else 403), (url, role)
    for action in ("pause", "abort"):
        response = client.post(f"/rotation-campaigns/{campaign.pk}/{action}/")
        assert response.status_code == (302 if role in writers else 403)
    campaign.refresh_from_db()
    assert campaign.state == ("aborted" if role in writers else "pending")


def test_anonymous_is_sent_to_the_login_page(client):
    assert client.get("/rotation-campaigns/")["Location"].startswith("/accounts/login/")


def test_new_campaign_page_previews_and_creates_with_the_typed_count(operator_client):
    fleet(7)
    page = operator_client.get("/rotation-campaigns/new/?search=device-camp&canary_size=2")
    text = page.content.decode()
    assert page.status_code == 200 and 'data-eligible="7"' in text and "Rotate 7 devices" in text
    form = {
        "search": "device-camp",
        "name": "Autumn",
        "kind": "secret",
        "reason": "policy",
        "canary_size": 2,
        "wave_size": 3,
        "min_confirm_ratio": 0.9,
        "min_reconnect_ratio": 0.9,
        "wave_timeout_seconds": 60,
        "confirm_count": "6",
    }
    response = operator_client.post("/rotation-campaigns/new/", form)
    assert response.status_code == 400 and "type 7 to confirm" in response.content.decode()
    assert not RotationCampaign.objects.exists()
    response = operator_client.post("/rotation-campaigns/new/", {**form, "confirm_count": "7"})
    campaign = RotationCampaign.objects.get()
    assert response.status_code == 302 and response["Location"] == f"/rotation-campaigns/{campaign.pk}/"
    assert campaign.filters == {"search": "device-camp"} and campaign.total == 7 and campaign.wave_size == 3
    assert campaign.waves.count() == 3


def test_campaign_page_shows_waves_the_pause_reason_and_the_debt_and_polls_while_live(operator_client, operator):
    fleet(12)
    campaign = create(operator, count=12, canary_size=2, wave_size=5)
    campaign_advance(campaign_id=campaign.pk)
    page = operator_client.get(f"/rotation-campaigns/{campaign.pk}/").content.decode()
    assert 'hx-trigger="every 2s"' in page and 'data-wave="0"' in page and "(canary)" in page
    assert "12</strong> devices of this campaign still are on a credential" in page
    assert page.index("device-camp0011") < page.index("device-camp0000")  # oldest credential first
    settle(campaign.waves.get(number=0), state="failed", confirmed=False)
    campaign_advance(campaign_id=campaign.pk)
    fragment = operator_client.get(f"/rotation-campaigns/{campaign.pk}/", headers={"HX-Request": "true"})
    text = fragment.content.decode()
    assert text.startswith('\n<div id="campaign-status"') or '<div id="campaign-status"' in text[:200]
    assert "<html" not in text and "Wave 0 (canary): 0 of 2 devices confirmed" in text
    assert "hx-trigger" not in text  # paused: it stops polling


# --- end to end: a campaign across a worker kill (H2's test covers one batch; this one a campaign in waves) -------

from tests.security.test_rotation import (  # noqa: E402  (H2's fixtures: the worker with the consumer, the broker)
    accepted,
    broker,  # noqa: F401
    roles_present,  # noqa: F401
    rotation_worker,  # noqa: F401
    start_worker,
)
from tests.support.waiting import wait_until  # noqa: E402


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_campaign_survives_a_worker_kill_and_rotates_every_device_exactly_once(
    broker,  # noqa: F811
    rotation_worker,  # noqa: F811
    devices,  # noqa: F811
    operator,
    settings,
):
    import signal

    from security import services
    from security.models import EnforcementChange
    from security.rotation import services as rotation_services

    worker = rotation_worker["worker"]
    n = 24
    secrets_by_id = {}
    for i in range(n):
        row = DeviceFactory(client_id=f"device-camp-e{i:03d}")
        secrets_by_id[row.client_id] = services.credential_issue(actor=operator, device=row).password
    last = EnforcementChange.objects.order_by("-pk").first()
    assert wait_until(lambda: EnforcementChange.objects.get(pk=last.pk).state == "applied", timeout=30.0), worker.log()[
        -3000:
    ]
    fleet_devices = [devices(cid, secret) for cid, secret in secrets_by_id.items()]
    assert wait_until(lambda: all(d.connected for d in fleet_devices), timeout=30)
    # Online as the console sees it (the consumer records the status every device sends on connect).
    assert wait_until(
        lambda: Device.objects.filter(client_id__startswith="device-camp-e", last_seen__isnull=False).count() == n,
        timeout=30.0,
    ), worker.log()[-3000:]

    campaign = campaigns.campaign_create(
        actor=operator,
        name="e2e",
        filters={"search": "device-camp-e"},
        reason="kill test",
        confirm_count=n,
        options=CampaignSettings(canary_size=4, wave_size=10, wave_timeout_seconds=400),
    )
    wave = {w.number: w for w in campaign.waves.all()}
    # The canary passes (every device confirmed and came back with its new secret); then wave 1 starts: kill -9.
    assert wait_until(lambda: RotationWave.objects.get(pk=wave[1].pk).state == "running", timeout=90), (
        list(campaign.waves.values_list("number", "state", "result")),
        worker.log()[-4000:],
    )
    assert RotationWave.objects.get(pk=wave[0].pk).result["confirm_rate"] == 1.0
    os.kill(worker.proc.pid, signal.SIGKILL)
    worker.proc.wait(10)

    campaign.refresh_from_db()
    assert campaign.state == "running"
    rotation_worker["worker"] = worker = start_worker(rotation_worker["db_name"])
    settings.ROTATION_RESEND_SECONDS = 1  # the tick runs here: the worker's setting (WORKER_ENV), not 120 s
    # What the periodic jobs do after a crash (their thresholds moved forward instead of waited out): the rotation
    # tick re-sends what the dead worker left pending, the campaign tick picks the campaign up again.
    CredentialRotation.objects.filter(campaign=campaign, state__in=["pending", "confirmed"]).update(
        updated=timezone.now() - dt.timedelta(seconds=120)
    )
    rotation_services.rotation_tick()
    assert campaigns.campaign_resume_stalled(older_than_seconds=0) == 1
    # The periodic jobs go on as beat would run them (here every 10 s): the broker reconcile applies an enforcement
    # change the dead worker left pending (such as the switch of the wave it was killed in), the rotation tick re-sends
    # to devices whose ack was lost while the consumer (inside the worker) was down; devices keep sending telemetry,
    # which is how the console sees them come back. A worker killed in the middle of an apply leaves the broker lock
    # held until it expires (120 s): nothing is applied until then, hence the long waits.
    from security.rotation import tasks as rotation_tasks
    from security.tasks import reconcile_broker

    last_jobs = [0.0]

    def completed():
        for d in fleet_devices:
            d.publish_telemetry({"t": 1.0})
        if time.monotonic() - last_jobs[0] > 10:
            last_jobs[0] = time.monotonic()
            reconcile_broker.delay("test")
            rotation_tasks.rotation_tick()  # the rotation tick and, with it, the campaigns' tick
        return RotationCampaign.objects.get(pk=campaign.pk).state == "completed"

    assert wait_until(completed, timeout=300, interval=0.5), (
        list(campaign.waves.values_list("number", "state", "result")),
        list(CredentialRotation.objects.filter(campaign=campaign).values_list("client_id", "state", "attempts")),
        worker.log()[-4000:],
    )
    # Every device rotated exactly once, all by this campaign, all completed (reconnected with the new secret).
    rotations = CredentialRotation.objects.filter(client_id__startswith="device-camp-e")
    assert rotations.count() == n
    assert set(rotations.values_list("campaign_id", flat=True)) == {campaign.pk}
    assert set(rotations.values_list("state", flat=True)) == {"completed"}
    assert set(campaign.waves.values_list("state", flat=True)) == {"passed"}
    assert campaign_reads.rotation_debt(RotationCampaign.objects.get(pk=campaign.pk))["total"] == 0
    assert wait_until(lambda: all(d.connected and d.store.load().previous is None for d in fleet_devices), timeout=30)
    for d in fleet_devices:
        d.stop()
    for d in fleet_devices[:4] + fleet_devices[-4:]:
        assert not accepted(d.client_id, secrets_by_id[d.client_id])
        assert accepted(d.client_id, d.store.load().current.secret)
    assert AuditEvent.objects.filter(action="rotation_campaign.complete", object_id=str(campaign.pk)).exists()


# --- in a real browser: the page follows the campaign without a reload; pause/resume/abort buttons ---------------


@pytest.mark.browser
@pytest.mark.slow
def test_campaign_page_follows_the_waves_live_and_the_buttons_work(live_server, roles_present, operator):  # noqa: F811
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"  # the test steps the campaign while the browser runs
    from playwright.sync_api import expect, sync_playwright

    from tests.factories import PASSWORD
    from tests.test_browser import ARTIFACTS, CHROMIUM_ARGS

    fleet(6)
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(15_000)
        try:
            base = live_server.url
            page.goto(f"{base}/accounts/login/?next=/rotation-campaigns/new/%3Fsearch%3Ddevice-camp")
            page.get_by_label("Username").fill(operator.username)
            page.get_by_label("Password").fill(PASSWORD)
            page.get_by_role("button", name="Log in").click()
            expect(page.locator("#campaign-preview")).to_have_attribute("data-eligible", "6")
            page.get_by_label("Name").fill("Browser rotation")
            page.get_by_label("Reason").fill("yearly")
            page.get_by_label("Canary wave (devices)").fill("2")
            page.get_by_label("Then waves of (devices)").fill("4")
            page.get_by_label("Type the number of devices to confirm").fill("6")
            page.screenshot(path=str(ARTIFACTS / "rotation-campaign-new.png"), full_page=True)
            page.get_by_role("button", name="Rotate 6 devices").click()
            expect(page).to_have_url(re.compile(r"/rotation-campaigns/\d+/$"))
            campaign = RotationCampaign.objects.get()
            assert page.url == f"{base}/rotation-campaigns/{campaign.pk}/"
            status = page.locator("#campaign-status")
            expect(status).to_have_attribute("data-state", "pending")
            campaign_advance(campaign_id=campaign.pk)
            settle(campaign.waves.get(number=0), state="completed")
            campaign_advance(campaign_id=campaign.pk)
            # No reload: the fragment polls every 2 s.
            expect(page.locator('tr[data-wave="0"]')).to_have_attribute("data-state", "passed")
            expect(page.locator('tr[data-wave="1"]')).to_have_attribute("data-state", "running")
            settle(campaign.waves.get(number=1), state="failed", confirmed=False)
            campaign_advance(campaign_id=campaign.pk)
            expect(page.locator("#campaign-pause-reason")).to_contain_text("Wave 1: 0 of 4 devices confirmed")
            page.reload()
            page.get_by_role("button", name="Resume").click()
            expect(page.locator(".messages")).to_contain_text("Resumed")
            expect(status).to_have_attribute("data-state", "running")
            page.on("dialog", lambda dialog: dialog.accept())
            page.get_by_role("button", name="Abort").click()
            expect(status).to_have_attribute("data-state", "aborted")
            page.screenshot(path=str(ARTIFACTS / "rotation-campaign.png"), full_page=True)
        finally:
            browser.close()
    campaign.refresh_from_db()
    assert campaign.state == "aborted"
    assert AuditEvent.objects.filter(action="rotation_campaign.abort", actor=operator).exists()
