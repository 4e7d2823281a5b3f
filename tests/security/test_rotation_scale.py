"""The handover's services at fleet scale (issue 7: 10,000 devices): start, deliver through the real broker with the
commander identity, confirm a consumer-sized batch of acks, switch. `make test` runs it at 2,500 devices, `make soak`
at 10,000. Generous bounds (a shared 2-core machine); the
full benchmark with simulated devices is bench/ and docs/benchmarks.md."""

import time

import pytest
from django.utils import timezone

from security.enforcement.secrets import hash_secret
from security.models import CredentialRotation, DeviceCredential, EnforcementChange
from security.rotation import policies
from security.rotation import services as rotation
from tests.factories import DeviceModelFactory

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.serial, pytest.mark.django_db]


@pytest.mark.parametrize(
    ("N", "bound"),
    [
        # make test: two delivery chunks and a partial consumer batch, every step at a size that shows its batching.
        pytest.param(2_500, 15, id="2500-devices"),
        # make soak: the fleet size.
        pytest.param(10_000, 30, id="10000-devices", marks=pytest.mark.soak),
    ],
)
def test_devices_start_deliver_confirm_and_switch_in_seconds(mosquitto, operator, settings, N, bound):
    from devices.models import Device

    model = DeviceModelFactory(name="Model-scale")
    Device.objects.bulk_create([Device(client_id=f"device-s{i:05d}", model=model) for i in range(N)], batch_size=2000)
    stored = hash_secret("not-a-real-secret-but-long-enough", iterations=1)
    now = timezone.now()
    DeviceCredential.objects.bulk_create(
        [
            DeviceCredential(device_id=pk, password_hash=stored, issued_at=now)
            for pk in Device.objects.values_list("pk", flat=True)
        ],
        batch_size=2000,
    )
    policy = policies.rotation_defaults_ensure()
    policy.switches_per_minute = 100_000
    policy.save()
    client_ids = [f"device-s{i:05d}" for i in range(N)]
    figures = {}

    started = time.monotonic()
    assert rotation.rotation_start_many(actor=operator, client_ids=client_ids, trigger="manual") == N
    figures["start"] = time.monotonic() - started

    ids = list(CredentialRotation.objects.order_by("pk").values_list("pk", flat=True))
    started = time.monotonic()
    published = 0
    for i in range(0, N, settings.ROTATION_DELIVER_CHUNK):
        published += rotation.rotation_deliver(rotation_ids=ids[i : i + settings.ROTATION_DELIVER_CHUNK])["published"]
    figures["deliver"] = time.monotonic() - started
    assert published == N  # every message acknowledged by the broker (PUBACK) through the commander identity

    acks = list(CredentialRotation.objects.values_list("client_id", "command_id"))
    started = time.monotonic()
    for i in range(0, N, 2000):  # the consumer hands over at most one batch (~2,000 messages) at a time
        rotation.rotations_confirm(acks=[(c, m, "ok", "") for c, m in acks[i : i + 2000]])
    figures["confirm"] = time.monotonic() - started
    assert CredentialRotation.objects.filter(state="confirmed").count() == N

    changes_before = EnforcementChange.objects.count()
    started = time.monotonic()
    for i in range(0, N, settings.ROTATION_DELIVER_CHUNK):
        rotation.rotation_switch(rotation_ids=ids[i : i + settings.ROTATION_DELIVER_CHUNK])
    figures["switch"] = time.monotonic() - started
    assert CredentialRotation.objects.filter(state="switched").count() == N
    assert EnforcementChange.objects.count() - changes_before == -(-N // settings.ROTATION_DELIVER_CHUNK)
    assert DeviceCredential.objects.exclude(password_hash=stored).count() == N
    print(f"rotation services at {N:,} devices (s):", {k: round(v, 2) for k, v in figures.items()})
    assert sum(figures.values()) < bound, figures  # measured ~10 s in all at 10,000 on this machine
