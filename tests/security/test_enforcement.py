"""Mosquitto-only enforcement cases: the stored secret forms the broker checks, and the canary probe that proves the
broker loaded and enforces the rendered files. The attack cases every broker must pass (anonymous, takeover,
cross-device, wildcards, oversize, quarantine, revocation) are tests/security/test_broker_attacks.py."""

import uuid

import pytest

from security import services
from security.enforcement.secrets import hash_secret
from security.models import DeviceCredential
from tests.factories import DeviceFactory
from tests.support.broker import apply_now, raw_connect_code

pytestmark = [pytest.mark.integration, pytest.mark.django_db]


def test_operator_supplied_secret_works_on_the_broker(mosquitto, operator):
    device = DeviceFactory(client_id="device-own")
    secret = "Zq7-" + uuid.uuid4().hex + uuid.uuid4().hex[:8]
    services.credential_issue(actor=operator, device=device, secret=secret)
    apply_now()
    assert raw_connect_code(mosquitto.port, client_id="device-own", username="device-own", password=secret) == 0


def test_password_line_generated_by_python_is_accepted_at_any_iteration_count(mosquitto, operator):
    """The stored $7$ form is what the broker checks, whatever the iteration count of that line."""
    device = DeviceFactory(client_id="device-iter")
    DeviceCredential.objects.create(
        device=device, password_hash=hash_secret("s3cret-" * 6, iterations=101), issued_at=device.created
    )
    apply_now()
    assert raw_connect_code(mosquitto.port, client_id="x", username="device-iter", password="s3cret-" * 6) == 0


def test_canary_probe_fails_when_the_broker_does_not_enforce_the_policy(mosquitto):
    """The probe is not a rubber stamp: an allow-all ACL (what an empty file means) makes it fail."""
    import os
    import signal

    from security.brokers import get_adapter
    from security.services import policy_desired

    policy = policy_desired()
    adapter = get_adapter()
    assert adapter.probe(policy).ok
    (mosquitto.dir / "acl").write_text("topic readwrite #\npattern readwrite #\n")
    log_before = len(mosquitto.log())
    os.kill(int((mosquitto.dir / "mosquitto.pid").read_text()), signal.SIGHUP)
    assert mosquitto.wait_for_log("Reloading config", timeout=5, after=log_before), mosquitto.log()[-2000:]
    result = adapter.probe(policy)
    assert result.generation_loaded and result.allowed_delivered
    assert result.forbidden_delivered and not result.ok


def test_canary_probe_sees_that_the_broker_has_not_loaded_the_files(mosquitto, operator):
    """Files written but no reload: the probe's generation password is refused, so nothing is shown as applied."""
    from security.brokers import get_adapter
    from security.services import policy_desired

    services.credential_issue(actor=operator, device=DeviceFactory(client_id="device-unloaded"))
    policy = policy_desired()
    adapter = get_adapter()
    adapter.probe_timeout = 0.5
    assert adapter.write(policy)
    result = adapter.probe(policy)
    assert not result.generation_loaded and not result.ok and "not loaded" in result.error
    assert result.refused_credential_refused


def test_canary_probe_works_in_a_process_with_many_open_descriptors(mosquitto):
    """paho's own loop uses select(), which fails for descriptors >= 1024; the probe drives paho with epoll."""
    import socket

    from security.brokers import get_adapter
    from security.services import policy_desired

    held = [socket.socket() for _ in range(1100)]
    try:
        assert held[-1].fileno() >= 1024
        assert get_adapter().probe(policy_desired()).ok
    finally:
        for sock in held:
            sock.close()
