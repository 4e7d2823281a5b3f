"""Dashboard figures (design.md, "Performance targets"): the device list and the overview with 100,000 devices,
server time p95 under 100 ms, with the number of SQL queries per page constant in fleet size.

Each page is requested through Django's test client in this process (the time is the server's: no network, no
browser), 50 times after 3 warm-up requests. Baseline in the same run: the device detail page, a lookup of one row
by a unique index, i.e. what a page costs when it does no fleet-sized work.
"""

from __future__ import annotations

import statistics
import time

from .broker import record

REPEATS = 50
WARMUP = 3
TARGET_MS = 100.0


def ensure_fleet(total: int) -> None:
    """Top the inventory up to ``total`` devices and give it the shape of a real one: models, groups, a
    firmware spread, and last_seen for most devices (some never seen)."""
    from datetime import timedelta

    from django.db.models import F
    from django.utils import timezone

    from devices.models import Device, DeviceGroup, DeviceModel

    existing = Device.objects.count()
    if existing < total:
        Device.objects.bulk_create(
            [Device(client_id=f"device-dash-{n:07d}") for n in range(existing, total)], batch_size=5000
        )
    models = [DeviceModel.objects.get_or_create(name=f"Model-{i}")[0] for i in range(5)]
    groups = [DeviceGroup.objects.get_or_create(name=f"site-{i}")[0] for i in range(8)]
    now = timezone.now()
    for i, model in enumerate(models):
        Device.objects.filter(id__gt=0).annotate(m=F("id") % len(models)).filter(m=i).update(
            model=model, firmware_version=f"1.{i}.0"
        )
    seen = Device.objects.filter(id__gt=0).annotate(m=F("id") % 10)
    seen.filter(m__lt=8).update(last_seen=now - timedelta(minutes=5))
    seen.filter(m=8).update(last_seen=now - timedelta(days=2))
    through = Device.groups.through
    if not through.objects.exists():
        ids = list(Device.objects.values_list("id", flat=True))
        through.objects.bulk_create(
            [through(device_id=pk, devicegroup_id=groups[pk % len(groups)].pk) for pk in ids], batch_size=5000
        )


def _time(client, url: str) -> tuple[list[float], int]:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    for _ in range(WARMUP):
        assert client.get(url).status_code == 200, url
    samples = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        response = client.get(url)
        samples.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200, url
    with CaptureQueriesContext(connection) as queries:
        client.get(url)
    return samples, len(queries)


def _p95(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=20)[-1]


def run(*, devices: int) -> list:
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Group
    from django.test import Client

    from devices.models import Device

    started = time.monotonic()
    ensure_fleet(devices)
    total = Device.objects.count()
    print(f"\nDashboard with {total:,} devices (fixture in {time.monotonic() - started:.1f} s)", flush=True)

    user, _ = get_user_model().objects.get_or_create(username="bench-operator")
    user.groups.add(Group.objects.get(name="operator"))
    client = Client(HTTP_HOST="127.0.0.1")  # an allowed host, as a browser on make run's address sends
    client.force_login(user)

    detail_url = f"/devices/{Device.objects.order_by('id').values_list('client_id', flat=True)[total // 2]}/"
    baseline, _ = _time(client, detail_url)
    base_p95 = _p95(baseline)
    from django.conf import settings

    middle = max(1, total // settings.FLEET_PAGE_SIZE // 2)
    pages = [
        ("overview", "/"),
        ("device list, first page", "/devices/"),
        (f"device list, page {middle} (the middle)", f"/devices/?page={middle}"),
        (
            "device list, filtered by status and model, sorted by last seen",
            "/devices/?status=active&model=Model-1&ordering=-last_seen",
        ),
        ("device list, search by client id", "/devices/?search=device-dash-0049"),
    ]
    for label, url in pages:
        samples, queries = _time(client, url)
        p95 = _p95(samples)
        record(
            f"{label}: server time p95",
            p95,
            "ms",
            target=TARGET_MS,
            baseline=base_p95,
            baseline_label="device detail page p95",
            note=f"median {statistics.median(samples):.1f} ms, {queries} SQL queries, {p95 / base_p95:.1f}x baseline",
        )
    return []
