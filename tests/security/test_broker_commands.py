"""manage.py render_broker_config and run_broker: the files, the pid file, Mosquitto in the foreground."""

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import call_command

from tests.support.broker import raw_connect_code
from tests.support.servers import BASE_DIR, stop, wait_for_port


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
