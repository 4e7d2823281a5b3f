"""`manage.py run_cluster` (what `make run-cluster` starts): the nodes the settings name, wired to the console's hook,
and stopped quickly enough for a process manager that kills after 5 s."""

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from fleet.ports import free_port
from security import services
from security.brokers.mqtt_client import connect_code
from security.brokers.rabbitmq_config import definitions
from security.brokers.rabbitmq_local import RabbitNode
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


COMPOSE_NODES = ("--cluster-node", "rabbit@rabbitmq-1", "--cluster-node", "rabbit@rabbitmq-2")


@pytest.fixture
def compose_settings(settings):
    settings.BROKER_BACKEND = "rabbitmq"
    settings.BROKER_HOOK_SECRET = "hook-secret-for-the-test"
    settings.RABBITMQ_MANAGEMENT_URLS = ["http://rabbitmq-1:15672", "http://rabbitmq-2:15672"]
    settings.MQTT_HOST = "rabbitmq-1"
    return settings


def test_render_rabbitmq_config_writes_what_every_compose_node_reads_readable_by_its_user_only(
    tmp_path, compose_settings
):
    settings = compose_settings
    call_command("render_rabbitmq_config", "--out", str(tmp_path), "--hook-host", "hook", *COMPOSE_NODES)
    conf = (tmp_path / "rabbitmq.conf").read_text()
    for check in ("user", "vhost", "resource", "topic"):
        assert f"auth_http.{check}_path = http://hook:8010/rabbitmq/hook-secret-for-the-test/{check}" in conf
    assert "cluster_formation.classic_config.nodes.2 = rabbit@rabbitmq-2" in conf
    assert f"load_definitions = {tmp_path / 'definitions.json'}" in conf
    users = json.loads((tmp_path / "definitions.json").read_text())["users"]
    assert [(u["name"], u["tags"]) for u in users] == [(settings.RABBITMQ_MANAGEMENT_USER, ["administrator"])]
    assert settings.RABBITMQ_MANAGEMENT_PASSWORD not in (tmp_path / "definitions.json").read_text()
    assert {oct(path.stat().st_mode & 0o777) for path in tmp_path.iterdir()} == {"0o600"}
    # Rendered again (a new hook secret, say): the same Erlang cookie, so the nodes still form one cluster.
    cookie = (tmp_path / "erlang.cookie").read_text()
    settings.BROKER_HOOK_SECRET = "another-hook-secret"
    call_command("render_rabbitmq_config", "--out", str(tmp_path), "--hook-host", "hook", *COMPOSE_NODES)
    assert "/rabbitmq/another-hook-secret/user" in (tmp_path / "rabbitmq.conf").read_text()
    assert (tmp_path / "erlang.cookie").read_text() == cookie and len(cookie) >= 32


@pytest.mark.parametrize(
    "change, message",
    [
        ({"BROKER_BACKEND": "mosquitto"}, "BROKER_BACKEND is 'mosquitto'"),
        ({"RABBITMQ_MANAGEMENT_URLS": ["http://127.0.0.1:15672"]}, "http://127.0.0.1:15672, which is not a node"),
        ({"MQTT_HOST": "mosquitto"}, "MQTT_HOST is 'mosquitto', not a node of this cluster"),
        ({"RABBITMQ_MANAGEMENT_PASSWORD": ""}, "RABBITMQ_MANAGEMENT_PASSWORD is not set"),
    ],
)
def test_render_rabbitmq_config_refuses_nodes_the_console_would_not_enforce_through(
    tmp_path, compose_settings, change, message
):
    for name, value in change.items():
        setattr(compose_settings, name, value)
    with pytest.raises(CommandError, match=re.escape(message)):
        call_command("render_rabbitmq_config", "--out", str(tmp_path / "out"), *COMPOSE_NODES)
    assert not (tmp_path / "out").exists()


def test_a_node_configured_as_in_compose_has_no_guest_and_its_admin_cannot_use_mqtt():
    """docker-compose's nodes import definitions.json at boot (render_rabbitmq_config): a real node with the same
    configuration has only the console's management user, which opens the management API and nothing over MQTT."""
    hook = HookServer().start()
    password = "management-password-for-the-test"
    node = RabbitNode(
        hook_url=hook.url("rabbitmq"),
        management_user="fk-admin",
        management_password=password,
        definitions=definitions(management_user="fk-admin", management_password=password),
    )
    try:
        node.start()
        assert node.ctl("list_users").split()[2:] == ["fk-admin", "[administrator]"]
        assert node.ctl("list_permissions").split()[4:] == []
        whoami = urllib.request.Request(
            f"{node.management_url}/api/whoami",
            headers={"Authorization": "Basic " + base64.b64encode(f"fk-admin:{password}".encode()).decode()},
        )
        assert json.loads(urllib.request.urlopen(whoami, timeout=5).read())["tags"] == ["administrator"]
        assert connect_code("127.0.0.1", node.mqtt_port, username="fk-admin", password=password, timeout=5) != 0
    finally:
        node.stop()
        hook.stop()
