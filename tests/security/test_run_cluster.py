"""`manage.py run_cluster` (what `make run-cluster` starts): the nodes the settings name, wired to the console's hook,
and stopped quickly enough for a process manager that kills after 5 s."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from fleet.ports import free_port
from security import services
from security.enforcement import cache
from security.management.commands.run_cluster import cluster_plan
from tests.factories import DeviceFactory
from tests.support.broker import MqttClient
from tests.support.hook import HookServer
from tests.support.waiting import wait_until


def test_the_plan_is_one_node_per_management_url_with_consecutive_mqtt_ports(settings, tmp_path):
    settings.VAR_DIR = tmp_path
    settings.MQTT_PORT = 18830
    settings.RABBITMQ_MANAGEMENT_URLS = ["http://127.0.0.1:15672", "http://localhost:15673", "http://127.0.0.1:15674"]
    plan = cluster_plan()
    assert [(node["mqtt_port"], node["management_port"]) for node in plan] == [
        (18830, 15672),
        (18831, 15673),
        (18832, 15674),
    ]
    assert plan[2]["directory"] == tmp_path / "rabbitmq" / "node-2"


@pytest.mark.parametrize(
    ("urls", "message"),
    [
        ([], "RABBITMQ_MANAGEMENT_URLS is empty"),
        (["http://rabbit-1.internal:15672"], "not a local address"),
        (["http://127.0.0.1"], "not a local address with a port"),
    ],
)
def test_a_plan_this_machine_cannot_run_is_refused_with_the_setting_to_fix(settings, urls, message):
    settings.RABBITMQ_MANAGEMENT_URLS = urls
    with pytest.raises(CommandError, match=message):
        cluster_plan()


def test_the_command_refuses_to_run_a_cluster_the_console_would_not_enforce_through(settings):
    settings.BROKER_BACKEND = "mosquitto"
    with pytest.raises(CommandError, match="BROKER_BACKEND is 'mosquitto'"):
        call_command("run_cluster")


@pytest.mark.soak
@pytest.mark.django_db(transaction=True)
def test_run_cluster_starts_nodes_that_ask_the_hook_and_stops_within_the_process_managers_grace(
    operator, tmp_path, settings
):
    settings.BROKER_BACKEND = "rabbitmq"  # this process's hook answers the cluster's questions
    cache.invalidate_all()
    device = DeviceFactory(client_id="device-run-cluster")
    secret = services.credential_issue(actor=operator, device=device).password
    hook = HookServer().start()
    mqtt_port = free_port()
    while free_port() == mqtt_port + 1:  # node 1 listens on the next port: it must be free too
        mqtt_port = free_port()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "fleet.settings_test",
        "FLEET_VAR_DIR": str(tmp_path),
        "BROKER_BACKEND": "rabbitmq",
        "MQTT_PORT": str(mqtt_port),
        "RABBITMQ_MANAGEMENT_URLS": f"http://127.0.0.1:{free_port()},http://127.0.0.1:{free_port()}",
        "BROKER_HOOK_PORT": str(hook.port),
    }
    env["BROKER_HOOK_SECRET"] = settings.BROKER_HOOK_SECRET  # the one this process's hook server checks
    out = (tmp_path / "run_cluster.out").open("w")
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "run_cluster", "--no-reconcile"],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    try:
        assert wait_until(lambda: "asks the hook" in (tmp_path / "run_cluster.out").read_text(), 150), (
            tmp_path / "run_cluster.out"
        ).read_text()
        for port in (mqtt_port, mqtt_port + 1):
            client = MqttClient(
                port,
                client_id="device-run-cluster",
                username="device-run-cluster",
                password=secret,
                protocol=mqtt.MQTTv311,
            )
            assert client.connect() == 0, f"node on {port} did not let the device in"
            client.close()
            refused = MqttClient(
                port,
                client_id="device-run-cluster",
                username="device-run-cluster",
                password="guess",
                protocol=mqtt.MQTTv311,
            )
            assert refused.connect() != 0, f"node on {port} let a wrong secret in"
            refused.close()
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        assert time.monotonic() - started < 5, "honcho kills what has not stopped after 5 s"
        assert subprocess.run(["pgrep", "-f", str(tmp_path / "rabbitmq")], capture_output=True).returncode == 1, (
            "a node outlived the command"
        )
    finally:
        if proc.poll() is None:
            proc.kill()
        hook.stop()
