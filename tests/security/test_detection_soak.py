"""Honest devices over many detection windows raise nothing, and their state is recorded: the baselines are learned
(DETECTION_BASELINE_MIN_WINDOWS windows) and then checked against the same honest traffic.

`make test` runs it with one-second windows (14 windows in 14 s); `make soak` runs the original minute of 5-second
windows (12 windows). Its own module: each profile needs a worker with its own window length, and only one consumer
identity may be connected to the broker at a time."""

import pytest
from django.db import connection

from devices.models import Device
from security.models import Alert, DeviceActivity
from tests.support.detection import broker_quiet, broker_watched, fleet, ingested, simulate, start_detection_worker

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

PROFILES = {
    # window seconds, simulated seconds, the simulator's rate, telemetry recorded per device at least: enough for the
    # value ranges to be learned (DETECTION_VALUE_MIN_SAMPLES, 30) and then checked
    "short": (1, 14.0, 8.0, 60),
    "minute": (5, 60.0, 4.0, 150),
}


@pytest.fixture
def watched_broker(request, mosquitto, django_db_blocker):
    window, *_ = PROFILES[request.param]
    with django_db_blocker.unblock():
        db_name = str(connection.settings_dict["NAME"])
    worker = start_detection_worker(db_name, DETECTION_WINDOW_SECONDS=str(window))
    try:
        log_start = broker_watched(mosquitto, worker)
        yield mosquitto
        broker_quiet(mosquitto, log_start)
    finally:
        worker.stop()


@pytest.mark.parametrize(
    ("watched_broker", "profile"),
    [("short", "short"), pytest.param("minute", "minute", marks=pytest.mark.soak)],
    indirect=["watched_broker"],
)
def test_honest_devices_raise_nothing_over_many_windows_and_their_state_is_recorded(watched_broker, operator, profile):
    _, duration, rate, telemetry_at_least = PROFILES[profile]
    specs = fleet(operator, 4)
    result = simulate(watched_broker, specs, duration=duration, rate=rate)
    assert ingested(specs, result), "the consumer never recorded the simulation's telemetry"
    assert list(Alert.objects.values_list("kind", "client_id")) == []
    for spec in specs:
        activity = DeviceActivity.objects.get(client_id=spec.client_id)
        assert activity.telemetry >= telemetry_at_least and activity.malformed == 0
        assert activity.last_status["firmware"] == "1.0.0"
        device = Device.objects.get(client_id=spec.client_id)
        assert device.last_seen is not None
