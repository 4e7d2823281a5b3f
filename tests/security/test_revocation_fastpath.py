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
    assert (fast.config, fast.acl, fast.passwd_text()) == (full.config, full.acl, full.passwd)
    assert (fast.digest, fast.generation, fast.probe_password) == (full.digest, full.generation, full.probe_password)
    assert "device-fast0:" not in fast.passwd_text() and "device-fast2:" in fast.passwd_text()
    # Only the new probe line is validated before the write: the rest was validated by the apply that wrote it.
    assert fast.new_passwd_lines == (fast.passwd_text().splitlines(keepends=True)[-1],)  # the probe line, last
    assert fast.new_passwd_lines[0].startswith("fleetkeeper-probe:") and not fast.acl_changed


def test_fast_path_write_installs_exactly_the_full_render(applied, support):
    """Written from bytes, without a read-back and with only the new line validated: the files on disk are still
    byte for byte what a full render would have written."""
    services.device_revoke(actor=support, device=applied[2], reason="stolen")
    fast = _fast()
    adapter = get_adapter()
    assert adapter.write(fast) is True
    full = services.policy_desired()
    loaded = adapter.loaded_files()
    assert (loaded.config, loaded.passwd, loaded.acl) == (full.config, full.passwd, full.acl)
    assert not list(adapter.dir.glob(".*.tmp"))  # no temp file left behind


def test_derived_write_refuses_a_bad_new_line(applied):
    """The lines a derived policy adds are validated: a malformed one never reaches the broker."""
    import dataclasses

    from security.brokers.base import BrokerRejected
    from security.brokers.files import derive_policy

    adapter = get_adapter()
    before = adapter.loaded_files()
    policy = derive_policy(
        adapter.loaded_bytes(),
        probe_username="fleetkeeper-probe",
        probe_secret="x" * 32,
        iterations=1,
        add=(("device-fast9", "$7$1$notbase64$short"),),
    )
    with pytest.raises(BrokerRejected):
        adapter.write(policy)
    broken = dataclasses.replace(policy, new_passwd_lines=policy.new_passwd_lines[:1], passwd_bytes=b"no newline")
    with pytest.raises(BrokerRejected):
        adapter.write(broken)
    after = adapter.loaded_files()
    assert (after.config, after.passwd, after.acl) == (before.config, before.passwd, before.acl)


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


def test_drop_lines_removes_whole_lines_only():
    from security.brokers.files import _drop_lines

    passwd = b"a:1\nb:2\nab:3\nb:4\nc:5\n"
    assert _drop_lines(passwd, {"b"}) == b"a:1\nab:3\nc:5\n"  # every line of b, not ab's
    assert _drop_lines(passwd, {"a", "c"}) == b"b:2\nab:3\nb:4\n"
    assert _drop_lines(passwd, {"x"}) == passwd
    many = {f"n{i}" for i in range(20)} | {"a"}  # the one-pass branch (a bulk chunk)
    assert _drop_lines(passwd, many) == b"b:2\nab:3\nb:4\nc:5\n"


def test_the_fast_path_reads_nothing_while_the_files_are_the_ones_it_wrote(applied, support, monkeypatch):
    """From this process's memory while the files keep the inode, size and mtime it left; read and hashed again as
    soon as anything replaced one of them (a restore from a backup, another worker's write)."""
    import os

    from security.brokers import files

    adapter = get_adapter()
    state = BrokerState.load()
    adapter.write(services.policy_desired())  # this process wrote them last
    reads = []
    real = files._read_bytes
    monkeypatch.setattr(files, "_read_bytes", lambda path: reads.append(path) or real(path))
    assert adapter.loaded_bytes_matching(state.applied_digest) is not None and reads == []
    passwd = adapter.paths["passwd"]
    copy = passwd.with_name("passwd.copy")
    copy.write_bytes(passwd.read_bytes())
    os.replace(copy, passwd)  # same bytes, another inode: no longer provably "what we wrote"
    assert adapter.loaded_bytes_matching(state.applied_digest) is not None and len(reads) == 3
    with open(passwd, "ab") as handle:
        handle.write(b"intruder:$7$1$AAAAAAAAAAAAAAAA$" + b"A" * 86 + b"==\n")
    assert adapter.loaded_bytes_matching(state.applied_digest) is None


def test_no_device_is_rendered_under_a_log_level_name(db):
    """The session watcher's grant is `pattern read $SYS/broker/log/%u`: a device named like a log level would read
    that level of the broker's log, so the renderer never renders one."""
    from security.brokers import broker_config, console_identities
    from security.brokers.render import DeviceRow, policy_render

    rows = [DeviceRow(name, "active", HASH) for name in ("E", "W", "N", "I", "D", "M")]
    rows.append(DeviceRow("device-ok", "active", HASH))
    policy = policy_render(cfg=broker_config(with_tls=False), devices=rows, console=console_identities())
    assert policy.device_usernames == ("device-ok",)
    assert set(policy.skipped) == {"E", "W", "N", "I", "D", "M"}
    assert "pattern read $SYS/broker/log/%u" in policy.acl.splitlines()
    assert [line.split(":")[0] for line in policy.passwd.splitlines()].count("N") == 1  # the watcher's own line


HASH = "$7$1$AAAAAAAAAAAAAAAA$" + "A" * 86 + "=="
