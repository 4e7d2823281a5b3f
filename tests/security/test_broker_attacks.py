"""The broker attack cases, one suite run against each real broker the console enforces through: Mosquitto with the
project's rendered files, and the two-node RabbitMQ cluster asking the console's hook (tests/security/conftest.py).

Each case is judged by what the broker delivers and refuses, never by SUBACK (Mosquitto's acl_file grants every
SUBSCRIBE and filters at delivery; see mosquitto-notes.md). Where the brokers differ in *how* they refuse, the case
asserts what the adapter's ``capabilities()`` says, so a capability that stops being true fails here:

- ``denial_disconnects``: a denied publish or subscribe ends the connection (RabbitMQ) or is ignored (Mosquitto);
- ``filters_each_delivery``: the ACL is checked on every delivery (Mosquitto) or once, at SUBSCRIBE (RabbitMQ);
- ``oversize_disconnects``: an oversize publish ends the connection (Mosquitto) or is dropped (RabbitMQ);
- ``rights_change_needs_reconnect``: a quarantine applies to the live session (Mosquitto) or kicks it (RabbitMQ);
- ``foreign_client_id``: a device's secret with another client id is renamed to its own (Mosquitto) or refused.

On the cluster, devices connect to node B where a case is about reach (revocation), the console to node A."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
import pytest
from django.conf import settings

from security import services
from security.brokers import get_adapter
from security.models import DeviceCredential
from tests.factories import DeviceFactory
from tests.security.conftest import RABBITMQ
from tests.support.broker import ConsoleClients, MqttClient, apply_now, raw_connect_code

pytestmark = [pytest.mark.integration, pytest.mark.django_db]

SETTLE = 0.5  # how long a message that should not arrive is given to arrive anyway
DROPPED = 5.0  # how long a broker is given to end a connection it ends


@dataclass
class Target:
    """One broker as the attack cases see it."""

    name: str
    ports: list[int]  # MQTT port of each node; the console uses the first
    protocol: int
    caps: dict
    log: object = None  # Mosquitto's log reader (``mosquitto.log``), None on a hook broker
    opened: list = field(default_factory=list)

    def client(self, client_id, username=None, password=None, *, node=0) -> MqttClient:
        made = MqttClient(
            self.ports[node], client_id=client_id, username=username, password=password, protocol=self.protocol
        )
        self.opened.append(made)
        return made

    def connected(self, client_id, username=None, password=None, *, node=0) -> MqttClient:
        made = self.client(client_id, username, password, node=node)
        code = made.connect()
        assert code == 0, f"{username} refused with {code} by {self.name} node {node}"
        return made

    def connect_code(self, client_id, username, password, *, node=0) -> int:
        return raw_connect_code(
            self.ports[node], client_id=client_id, username=username, password=password, protocol=self.protocol
        )

    def console(self, *filters) -> ConsoleClients:
        """The console: reads tx/+/... as the consumer identity, sends rx/<id>/... as the commander identity."""
        made = ConsoleClients(self.ports[0], protocol=self.protocol)
        self.opened.append(made)
        assert made.connect() == 0
        if filters:
            assert made.subscribe(*filters) == [1] * len(filters)
        return made

    def denied(self, session: MqttClient) -> None:
        """After a forbidden act: the connection ends where the broker says a denial ends it, and stays otherwise."""
        if self.caps["denial_disconnects"]:
            assert session.wait_disconnected(DROPPED), f"{self.name} should end a connection that was denied"
        else:
            assert not session.wait_disconnected(SETTLE) and session.is_connected, f"{self.name} dropped the session"

    def close(self) -> None:
        for made in self.opened:
            made.close()


@pytest.fixture(params=["mosquitto", pytest.param("rabbitmq", marks=RABBITMQ)])
def target(request):
    if request.param == "mosquitto":
        broker = request.getfixturevalue("mosquitto")
        made = Target("mosquitto", [broker.port], mqtt.MQTTv5, get_adapter().capabilities(), log=broker.log)
    else:
        cluster = request.getfixturevalue("cluster")
        request.getfixturevalue("rabbit")
        made = Target(
            "rabbitmq", [node.mqtt_port for node in cluster.nodes], mqtt.MQTTv311, get_adapter().capabilities()
        )
    assert made.caps["name"] == request.param  # the console enforces through the broker under test
    yield made
    made.close()


@pytest.fixture
def fleet(target, operator):
    """Two active devices with console-issued secrets, live on the broker: {"a": (device, secret), "b": ...}."""
    issued = {}
    for key in ("a", "b"):
        device = DeviceFactory(client_id=f"device-{key}")
        issued[key] = (device, services.credential_issue(actor=operator, device=device).password)
    apply_now()
    return issued


def nonce(label: str) -> bytes:
    return f"{label} {uuid.uuid4().hex[:8]}".encode()


def has(payload: bytes):
    return lambda messages: any(m.payload == payload for m in messages)


# --- logins -------------------------------------------------------------------------------------------------------


def test_the_console_issued_secret_connects(target, fleet):
    _, secret = fleet["a"]
    for node in range(len(target.ports)):
        assert target.connect_code("device-a", "device-a", secret, node=node) == 0


@pytest.mark.parametrize(
    ("client_id", "username", "password"),
    [
        pytest.param("device-a", None, None, id="anonymous"),
        pytest.param("device-a", "device-a", "not-the-secret", id="wrong-secret"),
        pytest.param("device-nobody", "device-nobody", "{secret}", id="unknown-username"),
        pytest.param("intruder-1", "intruder-1", "{secret}", id="outside-the-prefix"),
        pytest.param("x", "#", "{secret}", id="username-hash"),
        pytest.param("x", "+", "{secret}", id="username-plus"),
        pytest.param("x", "device-a/#", "{secret}", id="username-with-wildcard"),
        pytest.param("x", "$SYS", "{secret}", id="username-sys"),
        pytest.param("x", "", "{secret}", id="empty-username"),
    ],
)
def test_logins_outside_the_policy_are_refused(target, fleet, client_id, username, password):
    _, secret = fleet["a"]
    password = password.format(secret=secret) if password else None
    assert target.connect_code(client_id, username, password) != 0


def test_a_secret_presented_with_another_client_id_cannot_act_as_that_id(target, fleet):
    """A's secret with client id device-b: refused, or (Mosquitto's use_username_as_clientid) a session of device-a
    that neither takes B's session over nor receives what is sent to B."""
    _, secret_a = fleet["a"]
    _, secret_b = fleet["b"]
    real_b = target.connected("device-b", "device-b", secret_b)
    assert real_b.subscribe("rx/device-b/#") == [1]
    console = target.console()
    if target.caps["foreign_client_id"] == "refused":
        assert target.connect_code("device-b", "device-a", secret_a) != 0
        impostor = None
    else:
        assert target.caps["foreign_client_id"] == "renamed"
        impostor = target.connected("device-b", "device-a", secret_a)
        impostor.subscribe("rx/device-b/#")
        assert "as device-a" in target.log()
    sent = nonce("for b only")
    console.publish("rx/device-b/command", sent)
    assert real_b.wait_for(has(sent))
    assert real_b.is_connected  # B's session was not taken over
    if impostor is not None:
        assert not impostor.wait_for(lambda messages: messages, timeout=SETTLE)


# --- least privilege ----------------------------------------------------------------------------------------------

FORBIDDEN_SUBSCRIPTIONS = ["rx/device-b/#", "tx/device-b/#", "tx/+/telemetry", "rx/device-b/command"]
FORBIDDEN_PUBLISHES = ["rx/device-b/command", "tx/device-b/telemetry", "tx/device-b/status", "rx/device-a/command"]


@pytest.mark.parametrize("topic_filter", FORBIDDEN_SUBSCRIPTIONS)
def test_a_device_reads_nothing_of_another_devices_topics(target, fleet, topic_filter):
    _, secret_a = fleet["a"]
    _, secret_b = fleet["b"]
    b = target.connected("device-b", "device-b", secret_b)
    assert b.subscribe("rx/device-b/#") == [1]
    console = target.console("tx/+/telemetry")
    a = target.connected("device-a", "device-a", secret_a)
    a.client.subscribe(topic_filter, qos=1)  # a broker that refuses by disconnecting sends no SUBACK: do not wait
    target.denied(a)
    command, telemetry = nonce("command for b"), nonce("telemetry from b")
    console.publish("rx/device-b/command", command)
    b.publish("tx/device-b/telemetry", telemetry)
    # B's own traffic flows (positive controls)...
    assert b.wait_for(has(command))
    assert console.wait_for(has(telemetry))
    # ...and A received none of it.
    assert not a.wait_for(lambda messages: messages, timeout=SETTLE), a.topics()


@pytest.mark.parametrize("topic", FORBIDDEN_PUBLISHES)
def test_a_device_reaches_no_one_on_another_devices_topics(target, fleet, topic):
    """Including its own command channel: only the console's commander writes rx/<id>/..."""
    _, secret_a = fleet["a"]
    _, secret_b = fleet["b"]
    b = target.connected("device-b", "device-b", secret_b)
    assert b.subscribe("rx/device-b/#") == [1]
    console = target.console("tx/+/telemetry", "tx/+/status")
    a = target.connected("device-a", "device-a", secret_a)
    assert a.subscribe("rx/device-a/#") == [1]
    forged = nonce("forged")
    a.client.publish(topic, forged, qos=1)  # a broker that refuses by disconnecting sends no PUBACK: do not wait
    target.denied(a)
    # A message that may flow, published after the forged one, arrives: the forged one had its chance.
    control = nonce("real telemetry")
    sender = a if a.is_connected else target.connected("device-a", "device-a", secret_a)
    sender.publish("tx/device-a/telemetry", control)
    assert console.wait_for(has(control))
    assert forged not in console.payloads()
    assert not b.wait_for(has(forged), timeout=SETTLE)
    assert forged not in a.payloads() + sender.payloads()  # not even back to A, subscribed to its own rx/...


@pytest.mark.parametrize("topic_filter", ["#", "+/#", "$SYS/#", "rx/+/command"])
def test_a_wildcard_subscription_delivers_nothing_beyond_the_devices_own_channels(target, fleet, topic_filter):
    _, secret_a = fleet["a"]
    _, secret_b = fleet["b"]
    b = target.connected("device-b", "device-b", secret_b)
    console = target.console()
    monitor = None
    if target.caps["events"] == "log":  # the broker publishes its log on $SYS: a privileged reader sees it
        monitor = target.connected(
            "fleetkeeper-monitor", settings.MQTT_MONITOR_USERNAME, settings.MQTT_MONITOR_PASSWORD
        )
        assert monitor.subscribe("$SYS/broker/log/#") == [1]
    a = target.connected("device-a", "device-a", secret_a)
    a.client.subscribe(topic_filter, qos=1)  # a broker that refuses by disconnecting sends no SUBACK: do not wait
    target.denied(a)
    own = nonce("a command")
    b.publish("tx/device-b/telemetry", nonce("b telemetry"))
    console.publish("rx/device-b/command", nonce("b command"))
    console.publish("rx/device-a/command", own)  # A's own channel: a filter that covers it still delivers it
    target.connected("device-b", "device-b", secret_b).close()  # a login: a log line on $SYS where there is one
    if monitor is not None:
        assert monitor.wait_for(lambda ms: any(m.topic.startswith("$SYS/broker/log/") for m in ms))
    if a.is_connected and mqtt_filter_covers(topic_filter, "rx/device-a/command"):
        assert a.wait_for(has(own))
    else:
        a.wait_for(lambda messages: False, timeout=SETTLE)
    assert set(a.topics()) <= {"rx/device-a/command"}, a.topics()


def mqtt_filter_covers(topic_filter: str, topic: str) -> bool:
    return mqtt.topic_matches_sub(topic_filter, topic)


def test_an_oversize_publish_is_never_delivered(target, fleet):
    _, secret_a = fleet["a"]
    console = target.console("tx/+/telemetry")
    a = target.connected("device-a", "device-a", secret_a)
    oversize = b"x" * (settings.MQTT_MAX_PACKET_SIZE + 1)
    a.client.publish("tx/device-a/telemetry", oversize, qos=0)
    if target.caps["oversize_disconnects"]:
        assert a.wait_disconnected(DROPPED)
        if target.protocol == mqtt.MQTTv5:
            assert a.disconnect_reason == 0x95  # "Packet too large"
        a = target.connected("device-a", "device-a", secret_a)
    else:
        assert not a.wait_disconnected(SETTLE) and a.is_connected
    control = nonce("normal telemetry")
    a.publish("tx/device-a/telemetry", control)
    assert console.wait_for(has(control))
    assert all(len(payload) <= settings.MQTT_MAX_PACKET_SIZE for payload in console.payloads())


# --- status changes -----------------------------------------------------------------------------------------------


def test_quarantine_leaves_only_the_repair_path(target, fleet, operator, support):
    device, secret = fleet["a"]
    console = target.console("tx/+/telemetry", "tx/+/status", "tx/+/csr", "tx/+/ack")
    a = target.connected("device-a", "device-a", secret)
    assert a.subscribe("rx/device-a/#") == [1]
    services.device_quarantine(actor=support, device=device, reason="suspicious traffic")
    apply_now()
    if target.caps["rights_change_needs_reconnect"]:
        assert a.wait_disconnected(DROPPED), "the live session kept its rights: the quarantine must end it"
        a = target.connected("device-a", "device-a", secret)
        assert a.subscribe("rx/device-a/#") == [1]  # the device library's subscription: still granted
    else:
        assert a.is_connected  # the session and its subscription stay; the ACL applies to them at once
    sent = {channel: nonce(f"to {channel}") for channel in ("command", "config", "credentials", "firmware")}
    for channel, payload in sent.items():
        console.publish(f"rx/device-a/{channel}", payload)
    repair = {sent["credentials"], sent["firmware"]}
    assert a.wait_for(lambda messages: repair <= {m.payload for m in messages})
    if target.caps["filters_each_delivery"]:
        a.wait_for(lambda messages: False, timeout=SETTLE)
        assert set(a.payloads()) == repair
    # (A broker that checks a subscription once delivers what the commander sends; the console sends a device only
    # credentials and firmware, and no other identity may publish on rx/<id>/...)
    # It may acknowledge, and nothing else: each forbidden publish on a connection of its own.
    ack = nonce("ack")
    a.publish("tx/device-a/ack", ack)
    assert console.wait_for(has(ack))
    forged = {}
    for channel in ("telemetry", "status", "csr"):
        forged[channel] = nonce(f"from {channel}")
        a.client.publish(f"tx/device-a/{channel}", forged[channel], qos=1)
        target.denied(a)
        if not a.is_connected:
            a = target.connected("device-a", "device-a", secret)
    last_ack = nonce("ack after")
    a.publish("tx/device-a/ack", last_ack)
    assert console.wait_for(has(last_ack))
    assert not set(forged.values()) & set(console.payloads())
    # Reinstated, it gets everything back.
    services.device_reinstate(actor=operator, device=device, reason="cleaned")
    apply_now()
    if target.caps["rights_change_needs_reconnect"]:
        assert a.wait_disconnected(DROPPED)
        a = target.connected("device-a", "device-a", secret)
    again = nonce("telemetry again")
    a.publish("tx/device-a/telemetry", again)
    assert console.wait_for(has(again))


def test_a_revoked_device_is_dropped_and_cannot_reconnect_on_any_node(target, fleet, support):
    device, secret = fleet["a"]
    far = len(target.ports) - 1  # node B on the cluster: the console revokes through node A
    a = target.connected("device-a", "device-a", secret, node=far)
    services.device_revoke(actor=support, device=device, reason="stolen")
    apply_now()
    assert a.wait_disconnected(DROPPED)
    for node in range(len(target.ports)):
        assert target.connect_code("device-a", "device-a", secret, node=node) != 0
    assert not DeviceCredential.objects.filter(device=device).exists()
    _, secret_b = fleet["b"]
    assert target.connect_code("device-b", "device-b", secret_b, node=far) == 0  # B is untouched


def test_reissuing_a_secret_drops_the_session_using_the_old_one(target, fleet, operator):
    device, old_secret = fleet["a"]
    _, secret_b = fleet["b"]
    a = target.connected("device-a", "device-a", old_secret)
    b = target.connected("device-b", "device-b", secret_b)
    issued = services.credential_issue(actor=operator, device=device)
    apply_now()
    assert a.wait_disconnected(DROPPED)
    assert b.is_connected  # only the session whose credential changed is dropped
    assert target.connect_code("device-a", "device-a", old_secret) != 0
    assert target.connect_code("device-a", "device-a", issued.password) == 0
