"""De-duplication keeps bounded memory; reconnect delays grow, stay within their bounds and are jittered."""

import random

import pytest

from fleetkeeper_device.backoff import Backoff
from fleetkeeper_device.dedup import Deduplicator


def test_an_id_is_new_once_and_a_repeat_is_recognised():
    dedup = Deduplicator(capacity=10)
    assert dedup.first_time("cmd-1") is True
    assert dedup.first_time("cmd-1") is False
    assert dedup.first_time("cmd-2") is True


def test_memory_is_bounded_and_the_oldest_ids_are_forgotten_first():
    dedup = Deduplicator(capacity=100)
    for i in range(10_000):
        dedup.first_time(f"cmd-{i}")
        assert len(dedup) <= 100
    assert "cmd-9999" in dedup and "cmd-9900" in dedup
    assert "cmd-9899" not in dedup
    assert dedup.first_time("cmd-0") is True  # long forgotten


def test_a_repeat_refreshes_an_id_so_a_command_redelivered_often_is_not_evicted():
    dedup = Deduplicator(capacity=3)
    for message_id in ("a", "b", "c"):
        dedup.first_time(message_id)
    assert dedup.first_time("a") is False  # refresh: now b is the oldest
    dedup.first_time("d")
    assert "a" in dedup and "b" not in dedup


def test_remembered_ids_survive_through_a_snapshot():
    dedup = Deduplicator(capacity=5)
    dedup.remember(["x", "y"])
    restored = Deduplicator(capacity=5)
    restored.remember(dedup.snapshot())
    assert restored.first_time("x") is False and restored.first_time("z") is True


def test_capacity_must_be_positive():
    with pytest.raises(ValueError):
        Deduplicator(capacity=0)


def test_delays_stay_between_half_and_all_of_the_nominal_delay_and_never_exceed_the_cap():
    backoff = Backoff(initial=1.0, maximum=30.0, multiplier=2.0, rng=random.Random(1))
    for attempt in range(40):
        nominal = min(30.0, 2.0**attempt)
        delay = backoff.next()
        assert nominal / 2 <= delay <= nominal
        assert delay <= 30.0
    assert backoff.attempts == 40


def test_delays_grow_exponentially_until_the_cap():
    backoff = Backoff(initial=0.5, maximum=8.0)
    assert [backoff.nominal(n) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]
    assert backoff.nominal(10_000) == 8.0  # no overflow


def test_reset_starts_again_from_the_initial_delay():
    backoff = Backoff(initial=1.0, maximum=60.0)
    for _ in range(10):
        backoff.next()
    backoff.reset()
    assert 0.5 <= backoff.next() <= 1.0


def test_devices_that_lost_the_broker_together_do_not_come_back_together():
    delays = []
    for seed in range(200):
        backoff = Backoff(initial=1.0, maximum=60.0, rng=random.Random(seed))
        for _ in range(4):
            delay = backoff.next()
        delays.append(delay)
    assert all(4.0 <= d <= 8.0 for d in delays)
    assert len({round(d, 3) for d in delays}) > 150
    assert max(delays) - min(delays) > 3.0


@pytest.mark.parametrize("kwargs", [{"initial": 0}, {"initial": 2, "maximum": 1}, {"multiplier": 0.5}])
def test_nonsense_parameters_are_refused(kwargs):
    with pytest.raises(ValueError):
        Backoff(**kwargs)
