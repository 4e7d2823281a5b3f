"""List pages and the overview run a fixed number of SQL queries, whatever the size of the fleet: 10 devices
and 200 devices must cost the same (design.md, "Dashboard" target: constant in fleet size)."""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from devices import services
from tests.factories import DeviceFactory, DeviceGroupFactory, DeviceModelFactory


def grow_fleet_to(size: int, actor) -> None:
    """Devices spread over several models and groups, some seen recently, so every column has data."""
    from devices.models import Device

    models = [DeviceModelFactory(name=f"Model-{n}") for n in range(3)]
    groups = [DeviceGroupFactory(name=f"group-{n}") for n in range(4)]
    for n in range(Device.objects.count(), size):
        device = DeviceFactory(
            client_id=f"device-q{n:04d}",
            model=models[n % 3],
            last_seen=timezone.now() if n % 2 else None,
        )
        device.groups.add(groups[n % 4], groups[(n + 1) % 4])
        if n % 5 == 0:
            services.device_update(actor=actor, device=device, data={"name": f"renamed {n}"})


def queries_for(client, url, params=None, headers=None) -> int:
    with CaptureQueriesContext(connection) as captured:
        response = client.get(url, params or {}, headers=headers or {})
    assert response.status_code == 200
    return len(captured.captured_queries)


PAGES = [
    (
        "device list, filtered and sorted",
        "device-list",
        {"search": "device-q", "status": "active", "ordering": "-last_seen"},
        None,
    ),
    ("device list, sorted by model", "device-list", {"ordering": "model", "seen": "recent"}, None),
    ("device list, live search fragment", "device-list", {"search": "q0", "ordering": "name"}, {"HX-Request": "true"}),
    ("device list, second page", "device-list", {"page": "2"}, None),
    ("overview", "overview", None, None),
    ("device models", "devicemodel-list", None, None),
    ("groups", "devicegroup-list", None, None),
    ("audit log", "audit-log", {"action": "device."}, None),
]


@pytest.mark.parametrize("name,url_name,params,headers", PAGES, ids=[p[0] for p in PAGES])
def test_query_count_does_not_grow_with_the_fleet(name, url_name, params, headers, client, admin_user_role, settings):
    settings.FLEET_PAGE_SIZE = 8  # so that 10 devices already fill more than one page
    client.force_login(admin_user_role)
    url = reverse(url_name)
    grow_fleet_to(10, admin_user_role)
    client.get(url, params or {})  # warm up: session, content types
    small = queries_for(client, url, params, headers)
    grow_fleet_to(200, admin_user_role)
    large = queries_for(client, url, params, headers)
    assert small == large, f"{name}: {small} queries with 10 devices, {large} with 200"
    assert large <= 15, f"{name}: {large} queries is more than a page needs"
