"""What the detection tests share: the worker that runs the MQTT consumer and broker-log monitor, a fleet with
console-issued secrets, and the simulator run against the test broker."""

from __future__ import annotations

import time

import redis
from django.conf import settings

from fleet.celery import app as celery_app
from fleetkeeper_device.simulator import DeviceSpec, Simulation
from security import services
from security.models import DeviceActivity
from tests.factories import DeviceFactory

from .servers import CeleryWorker
from .waiting import wait_until

WORKER_ENV = {
    "DETECTION_CONSUMER_ENABLED": "1",
    "DETECTION_RECONNECT_MAX_SECONDS": "1",
    "DETECTION_FLUSH_SECONDS": "0.2",
    "DETECTION_WINDOW_SECONDS": "5",
    "DETECTION_RATE_ABSOLUTE_PER_WINDOW": "120",
    "DETECTION_AUTH_FAILURES_BRUTE_FORCE": "4",
    "DETECTION_PROBE_HOLD_SECONDS": "1.0",
    # The monitor tails <MQTT_BROKER_DIR>/broker-debug.log; only the test that renders the broker with the option
    # makes the broker write it (elsewhere the file does not exist and nothing is read).
    "DETECTION_DENIED_PUBLISHES": "1",
    # The silence check runs in the worker (the task beat would send), with a short limit.
    "DETECTION_SILENCE_SECONDS": "3",
}
# Every hostile device subscribes to #, +/# and $SYS/# as soon as it connects (fleetkeeper_device/hostile.py).
ON_CONNECT = {"subscription_violation"}
QUEUE = "detection-tests"


def start_detection_worker(db_name: str, **overrides: str) -> CeleryWorker:
    """Its own queue: it runs the consumer only, not the tests' enforcement tasks (they run inline)."""
    return CeleryWorker(db_name=db_name, extra_env={**WORKER_ENV, **overrides}, queues=QUEUE).start()


def broker_watched(mosquitto, worker: CeleryWorker) -> int:
    """Wait until the worker's consumer and monitor are connected and subscribed; forget earlier tests' counters.
    Returns where this test's part of the broker log begins (for `broker_quiet`)."""
    r = redis.Redis.from_url(settings.REDIS_URL)
    for key in r.scan_iter(f"{settings.DETECTION_REDIS_PREFIX}:*"):
        r.delete(key)
    assert mosquitto.wait_for_log("fleetkeeper-consumer 1 $share/", timeout=15), worker.log()[-3000:]
    assert mosquitto.wait_for_log("fleetkeeper-monitor 0 $SYS/broker/log/#", timeout=15), mosquitto.log()[-3000:]
    return len(mosquitto.log())


def refusals_judged(mosquitto, log_start: int, hold_seconds: float) -> bool:
    """The monitor holds each refused login for DETECTION_PROBE_HOLD_SECONDS before it judges it. True once the
    last refusal in the broker log after ``log_start`` (its lines start with the epoch second) is older than that
    hold, at once when the broker refused nobody; False if refusals went on for ten seconds more."""
    hold = hold_seconds + 1.5  # + the log's one-second resolution, + the tick that writes the judgement

    def last_refusal() -> float:
        stamps = [
            float(line.split(":", 1)[0])
            for line in mosquitto.log()[log_start:].splitlines()
            if "not authorised" in line and line.split(":", 1)[0].isdigit()
        ]
        return max(stamps, default=0.0)

    return wait_until(lambda: time.time() - last_refusal() > hold, timeout=hold + 10, interval=0.1)


def broker_quiet(mosquitto, log_start: int) -> None:
    """Before the database is emptied: the monitor's judgement of this test's refused logins must not land in the
    next test; and the tasks this test's commits queued must not run there either."""
    hold = float(WORKER_ENV["DETECTION_PROBE_HOLD_SECONDS"])
    assert refusals_judged(mosquitto, log_start, hold), "the broker kept refusing logins after the test ended"
    celery_app.control.purge()


def fleet(operator, n: int, *, hostile: int = 0, firmware: str = "1.0.0") -> list[DeviceSpec]:
    rows = [DeviceFactory() for _ in range(n)]
    specs = [
        DeviceSpec(
            row.client_id,
            services.credential_issue(actor=operator, device=row).password,
            firmware=firmware,
            hostile=i < hostile,
        )
        for i, row in enumerate(rows)
    ]
    result = services.enforcement_apply(coalesce=False)
    assert result is not None and result.probe.ok, result
    return specs


def simulate(broker, specs, *, attacks=("flood",), duration=4.0, rate=4.0, **kwargs) -> dict:
    """The simulation's summary, plus ``sent_by_device``: how many telemetry messages each device published."""

    class Out:
        def write(self, text):
            pass

    simulation = Simulation(
        specs,
        host="127.0.0.1",
        port=broker.port,
        rate=rate,
        duration=duration,
        max_packet_size=settings.MQTT_MAX_PACKET_SIZE,
        seed=7,
        out=Out(),
        hostile_interval=0.4,
        flood_burst=200,
        attacks=attacks,
        **kwargs,
    )
    result = simulation.run()
    result["sent_by_device"] = {device.client_id: device.stats["telemetry"] for device in simulation.devices}
    return result


def ingested(specs, result: dict, timeout: float = 15.0) -> bool:
    """The consumer has recorded every telemetry message the honest devices of the simulation published: whatever
    the simulation was going to raise has been raised by then (detectors run on a batch before its counts are
    written). Hostile devices are left out: the broker may cut one off with messages still in flight."""
    sent = {spec.client_id: result["sent_by_device"][spec.client_id] for spec in specs if not spec.hostile}

    def recorded():
        rows = dict(DeviceActivity.objects.filter(client_id__in=list(sent)).values_list("client_id", "telemetry"))
        return all(rows.get(client_id, 0) >= count for client_id, count in sent.items())

    return wait_until(recorded, timeout=timeout, interval=0.1)
