"""manage.py render_broker_config and run_broker: the files, the pid file, Mosquitto in the foreground."""

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import call_command

from fleet.ports import wait_for_port
from tests.support.broker import raw_connect_code
from tests.support.servers import BASE_DIR, stop


@pytest.mark.django_db
def test_render_broker_config_writes_the_three_files(mqtt_test_settings):
    out = io.StringIO()
    call_command("render_broker_config", stdout=out)
    broker_dir = Path(mqtt_test_settings["dir"])
    for name in ("mosquitto.conf", "passwd", "acl"):
        assert (broker_dir / name).stat().st_size > 0
    assert "files written" in out.getvalue()
    call_command("render_broker_config", stdout=(again := io.StringIO()))
    assert "already up to date" in again.getvalue()
    for child in broker_dir.iterdir():
        child.unlink() if child.is_file() else None


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)  # run_broker (another process) commits the CAs it creates
def test_run_broker_execs_mosquitto_with_the_rendered_config(mqtt_test_settings):
    from django.db import connection

    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "fleet.settings_test",
        "FLEET_TEST_DB_NAME": str(connection.settings_dict["NAME"]),
    }
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "run_broker", "--no-reconcile"],
        cwd=BASE_DIR,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(mqtt_test_settings["port"], timeout=20, proc=proc)
        pid_file = Path(mqtt_test_settings["dir"]) / "mosquitto.pid"
        assert int(pid_file.read_text()) == proc.pid  # exec kept the pid: the adapter signals the broker itself
        assert b"mosquitto" in Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert (
            raw_connect_code(
                mqtt_test_settings["port"],
                client_id="c",
                username=settings.MQTT_CONSUMER_USERNAME,
                password=settings.MQTT_CONSUMER_PASSWORD,
            )
            == 0
        )
        assert raw_connect_code(mqtt_test_settings["port"], client_id="anon", username=None, password=None) != 0
    finally:
        stop(proc)
        for child in Path(mqtt_test_settings["dir"]).iterdir():
            if child.is_file():
                child.unlink()


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_run_broker_supervise_restarts_a_broker_that_died_and_stops_with_it(mqtt_test_settings):
    """docs/broker.md, "Known broker bug": Mosquitto 2.0.11 can crash. Under --supervise (make run) the broker comes
    back by itself, with a new pid in the pid file (the one the worker signals), and SIGTERM stops both."""
    import signal
    import time

    from django.db import connection

    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "fleet.settings_test",
        "FLEET_TEST_DB_NAME": str(connection.settings_dict["NAME"]),
    }
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "run_broker", "--no-reconcile", "--supervise"],
        cwd=BASE_DIR,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    pid_file = Path(mqtt_test_settings["dir"]) / "mosquitto.pid"
    port = mqtt_test_settings["port"]
    consumer = {"username": settings.MQTT_CONSUMER_USERNAME, "password": settings.MQTT_CONSUMER_PASSWORD}
    try:
        wait_for_port(port, timeout=20, proc=proc)
        first = int(pid_file.read_text())
        assert first != proc.pid and b"mosquitto" in Path(f"/proc/{first}/cmdline").read_bytes()
        assert raw_connect_code(port, client_id="c1", **consumer) == 0
        os.kill(first, signal.SIGSEGV)  # what the broker bug looks like from outside
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (not pid_file.exists() or int(pid_file.read_text() or 0) == first):
            time.sleep(0.1)
        second = int(pid_file.read_text())
        assert second != first and proc.poll() is None
        wait_for_port(port, timeout=20, proc=proc)
        assert raw_connect_code(port, client_id="c2", **consumer) == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) is not None
        assert not Path(f"/proc/{second}").exists() or b"mosquitto" not in Path(f"/proc/{second}/cmdline").read_bytes()
        output = proc.stdout.read().decode(errors="replace")
        assert "restarting in" in output, output[-2000:]
    finally:
        stop(proc)
        for child in Path(mqtt_test_settings["dir"]).iterdir():
            if child.is_file():
                child.unlink()
