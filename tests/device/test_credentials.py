"""What a device keeps during a rotation, and the file store firmware teams can use as is."""

import json
import os
import stat
import subprocess
import sys

import pytest

from fleetkeeper_device.credentials import Credential, CredentialSet, FileCredentialStore, MemoryCredentialStore

A, B, C = Credential("secret-a" * 4), Credential("secret-b" * 4), Credential("secret-c" * 4)


def test_a_rotation_keeps_the_secret_that_worked_as_previous():
    rotated = CredentialSet(current=A).rotated(B)
    assert (rotated.current, rotated.previous) == (B, A)


def test_confirming_the_new_secret_forgets_the_previous_one():
    assert CredentialSet(current=B, previous=A).confirmed() == CredentialSet(current=B)


def test_a_second_rotation_before_the_first_is_confirmed_keeps_the_secret_the_broker_last_accepted():
    # The live session logged in with A; B was never accepted. C arrives: fall back to A, not to B.
    state = CredentialSet(current=A).rotated(B).rotated(C, proven=A)
    assert (state.current, state.previous) == (C, A)


def test_the_same_secret_sent_twice_changes_nothing():
    state = CredentialSet(current=B, previous=A)
    assert state.rotated(Credential(B.secret)) is state


def test_a_secret_never_appears_in_a_repr_or_a_log_line():
    assert "secret-a" not in repr(CredentialSet(current=A, previous=B))


def test_memory_store_starts_from_a_secret():
    assert MemoryCredentialStore(secret="s" * 20).load().current.secret == "s" * 20


def test_file_store_round_trips_and_is_readable_by_the_owner_only(tmp_path):
    path = tmp_path / "device" / "credentials.json"
    store = FileCredentialStore(path)
    assert store.load() == CredentialSet()
    state = CredentialSet(
        current=B, previous=A, certificate_pem="-----BEGIN CERTIFICATE-----\n", pending_request_id="r1"
    )
    store.save(state)
    assert FileCredentialStore(path).load() == state
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["credentials.json"]  # no temporary files left behind


def test_file_store_ignores_fields_written_by_a_newer_library(tmp_path):
    path = tmp_path / "credentials.json"
    path.write_text(json.dumps({"current": {"secret": "x" * 20}, "hardware_slot": 3}))
    assert FileCredentialStore(path).load().current.secret == "x" * 20


def test_a_failed_save_leaves_the_previous_file_intact(tmp_path):
    path = tmp_path / "credentials.json"
    store = FileCredentialStore(path)
    store.save(CredentialSet(current=A))
    with pytest.raises(TypeError):
        store.save(CredentialSet(current=Credential(secret=object())))  # not serialisable
    assert store.load().current == A
    assert [p.name for p in tmp_path.iterdir()] == ["credentials.json"]


def test_the_library_imports_without_django():
    code = (
        "import sys, fleetkeeper_device, fleetkeeper_device.simulator, fleetkeeper_device.hostile;"
        "assert not any(m == 'django' or m.startswith('django.') for m in sys.modules), 'django was imported'"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    result = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
