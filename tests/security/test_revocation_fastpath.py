"""The revocation fast path cuts lines out of the loaded files instead of rendering the fleet: it must give exactly
the policy a full render gives, and step aside whenever it cannot prove that."""

import pytest

from security import services
from security.brokers import get_adapter
from security.models import BrokerState
from security.revocation import policy_fast_revoke
from tests.factories import DeviceFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def applied(operator, render_broker_files):
    """Three devices with secrets; the files on disk are what the last apply wrote."""
    devices = [DeviceFactory(client_id=f"device-fast{n}") for n in range(3)]
    for device in devices:
        services.credential_issue(actor=operator, device=device)
    policy = render_broker_files()
    state = BrokerState.load()
    state.applied_digest = policy.digest
    state.save()
    from security.models import EnforcementChange

    EnforcementChange.objects.update(state="applied")
    return devices


def _fast():
    return policy_fast_revoke(up_to_id=services._pending_max_id(), state=BrokerState.load(), adapter=get_adapter())


def test_fast_path_equals_a_full_render(applied, support):
    services.device_revoke(actor=support, device=applied[0], reason="stolen")
    services.device_revoke(actor=support, device=applied[1], reason="stolen too")
    fast = _fast()
    full = services.policy_desired()
    assert fast is not None
    assert (fast.config, fast.acl, fast.passwd) == (full.config, full.acl, full.passwd)
    assert (fast.digest, fast.generation, fast.probe_password) == (full.digest, full.generation, full.probe_password)
    assert "device-fast0:" not in fast.passwd and "device-fast2:" in fast.passwd


def test_fast_path_steps_aside_when_it_cannot_prove_the_result(applied, support, operator):
    # Anything but revocations pending: full render.
    services.device_revoke(actor=support, device=applied[0], reason="stolen")
    services.credential_issue(actor=operator, device=DeviceFactory(client_id="device-fastnew"))
    assert _fast() is None


def test_fast_path_steps_aside_on_drift(applied, support):
    services.device_revoke(actor=support, device=applied[0], reason="stolen")
    passwd = get_adapter().cfg.password_file
    with open(passwd, "a") as handle:
        handle.write("intruder:$7$1$AAAAAAAAAAAAAAAA$" + "A" * 86 + "==\n")
    assert _fast() is None  # the files are not what the last apply wrote


def test_fast_path_steps_aside_for_a_quarantined_device(applied, support):
    from security.models import EnforcementChange

    services.device_quarantine(actor=support, device=applied[1], reason="odd")
    policy = services.policy_desired()
    get_adapter().write(policy)
    state = BrokerState.load()
    state.applied_digest = policy.digest
    state.save()
    EnforcementChange.objects.update(state="applied")
    services.device_revoke(actor=support, device=applied[1], reason="worse")
    assert _fast() is None
