"""The simulator's parts that need no broker: reading credentials, choosing hostile devices, telemetry shapes,
and the reactor's timers and thread hand-off."""

import io
import random
import threading
import time

import pytest

from fleetkeeper_device import protocol
from fleetkeeper_device.reactor import Reactor
from fleetkeeper_device.simulator import DeviceSpec, Sensors, choose_hostile, load_credentials


def test_credentials_load_from_the_api_shape_a_mapping_or_csv():
    api = (
        '[{"client_id": "device-1", "username": "device-1", "password": "s1"},'
        ' {"username": "device-2", "password": "s2"}]'
    )
    assert load_credentials(io.StringIO(api)) == [DeviceSpec("device-1", "s1"), DeviceSpec("device-2", "s2")]
    assert load_credentials(io.StringIO('{"device-3": "s3"}')) == [DeviceSpec("device-3", "s3")]
    csv_text = "client_id,secret,firmware\n# comment\ndevice-4,s4,2.0.1\ndevice-5,s5\n"
    assert load_credentials(io.StringIO(csv_text)) == [
        DeviceSpec("device-4", "s4", firmware="2.0.1"),
        DeviceSpec("device-5", "s5"),
    ]


@pytest.mark.parametrize("text, words", [('[{"client_id": "d"}]', "entry 1 needs"), ("device-1\n", "line 1: expected")])
def test_incomplete_credentials_are_refused_with_the_place(text, words):
    with pytest.raises(ValueError, match=words):
        load_credentials(io.StringIO(text))


def test_hostile_devices_are_chosen_at_random_and_counted_exactly():
    specs = [DeviceSpec(f"device-{i}", "s") for i in range(20)]
    picks = set()
    for seed in range(10):
        chosen = [s.client_id for s in choose_hostile(specs, 3, random.Random(seed)) if s.hostile]
        assert len(chosen) == 3
        picks.add(tuple(chosen))
    assert len(picks) > 5
    with pytest.raises(ValueError):
        choose_hostile(specs, 21, random.Random(0))


def test_every_device_has_its_own_valid_telemetry_shape():
    readings = []
    for seed in range(50):
        sensors = Sensors(random.Random(seed))
        series = [sensors.read(1_763_788_800 + 10 * i) for i in range(200)]
        for values in series:
            protocol.encode_telemetry(message_id="t-1", ts=1.0, seq=1, values=values)  # valid protocol
            assert -40 < values["temperature"] < 60 and -120 < values["signal"] < -20
            assert 0 < values.get("battery", 50) <= 100
        readings.append(sum(v["temperature"] for v in series) / len(series))
    assert max(readings) - min(readings) > 5  # baselines differ between devices


def test_reactor_runs_timers_in_order_and_skips_cancelled_ones():
    reactor = Reactor()
    seen = []
    reactor.call_later(0.03, seen.append, "third")
    reactor.call_later(0.01, seen.append, "first")
    reactor.call_later(0.02, seen.append, "second")
    reactor.call_later(0.015, seen.append, "cancelled").cancel()
    reactor.call_later(0.05, reactor.stop)
    reactor.run(until=reactor.clock() + 2)
    reactor.close()
    assert seen == ["first", "second", "third"]


@pytest.mark.serial  # a half-second bound on a thread's wake-up
def test_reactor_takes_work_from_other_threads_without_waiting_for_a_timer():
    reactor = Reactor()
    reactor.call_later(60, lambda: None)  # nothing else would wake the loop for a minute
    thread = reactor.start_thread()
    done = threading.Event()
    started = time.monotonic()
    reactor.call_soon_threadsafe(done.set)
    assert done.wait(1) and time.monotonic() - started < 0.5
    reactor.stop()
    thread.join(2)
    assert not thread.is_alive()
    reactor.close()


def test_a_failing_callback_does_not_stop_the_loop():
    reactor = Reactor()
    seen = []
    reactor.call_later(0.0, lambda: 1 / 0)
    reactor.call_later(0.01, seen.append, "still running")
    reactor.run(until=reactor.clock() + 0.1)
    reactor.close()
    assert seen == ["still running"]
