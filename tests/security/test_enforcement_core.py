"""The enforcement core's rules, broker-neutral: who may connect, publish and subscribe (security/enforcement/), and
the RabbitMQ hook's answers to what the broker posts (security/brokers/rabbitmq.py), through Django's test client.
The same rules against a real RabbitMQ node: tests/security/test_rabbitmq.py."""

import pytest

from devices.models import Device
from security import services
from security.enforcement import decisions
from security.enforcement.policy import covers, device_identity, is_valid_filter, pattern_matches
from security.enforcement.secrets import hash_secret
from security.enforcement.state import console_identities_desired, identity_desired
from tests.factories import DeviceFactory

SECRET = "a-device-secret-that-is-long-enough-0123456789"


def device(status="active", client_id="device-a", secret=SECRET):
    return device_identity(
        client_id=client_id,
        status=status,
        secret_hash=hash_secret(secret, iterations=1) if secret else "",
        rx_prefix="rx",
        tx_prefix="tx",
        max_packet_bytes=65536,
    )


def connect(identity, password=SECRET, client_id="device-a", username="device-a"):
    return decisions.connect_decision(identity, username=username, password=password, client_id=client_id)


def test_a_device_connects_only_with_its_secret_its_own_client_id_and_an_enforced_status():
    assert connect(device()) == decisions.ALLOW
    assert connect(device(), password="wrong").reason == "bad_secret"
    assert connect(device(), client_id="device-b").reason == "client_id_mismatch"
    assert connect(device(), password="").reason == "anonymous"
    assert connect(None).reason == "unknown_username"
    assert connect(device(status="quarantined")) == decisions.ALLOW  # it keeps the repair path
    assert not connect(device(status="revoked"))
    assert not connect(device(secret=""), password="anything")
    assert connect(device(), password="x" * 5000).reason == "malformed"


@pytest.mark.parametrize(
    ("topic", "status", "allowed"),
    [
        ("tx/device-a/telemetry", "active", True),
        ("tx/device-a/ack", "active", True),
        ("tx/device-a/secrets", "active", False),  # not a channel
        ("tx/device-b/telemetry", "active", False),  # another device's topic
        ("rx/device-a/command", "active", False),  # a device never writes its own receive channels
        ("tx/device-a/telemetry/x", "active", False),
        ("tx/+/telemetry", "active", False),  # a wildcard is not a topic
        ("$SYS/broker/log/N", "active", False),
        ("tx/device-a/telemetry", "quarantined", False),  # quarantine: only the repair path
        ("tx/device-a/ack", "quarantined", True),
    ],
)
def test_a_device_publishes_only_on_its_own_channels(topic, status, allowed):
    decision = decisions.publish_decision(device(status=status), client_id="device-a", topic=topic)
    assert decision.allow is allowed, decision


@pytest.mark.parametrize(
    ("topic_filter", "allowed"),
    [
        ("rx/device-a/#", True),
        ("rx/device-a/+", True),
        ("rx/device-a/command", True),
        ("#", False),
        ("+/#", False),
        ("$SYS/#", False),
        ("rx/+/command", False),
        ("rx/device-b/#", False),
        ("tx/device-a/telemetry", False),
        ("rx/device-a/#/x", False),  # not a valid filter
        ("rx/device-a/comm+", False),
    ],
)
def test_a_device_subscribes_only_within_its_own_receive_channels(topic_filter, allowed):
    decision = decisions.subscribe_decision(device(), client_id="device-a", topic_filter=topic_filter)
    assert decision.allow is allowed, decision


def test_topic_rights_are_refused_to_another_client_id_or_a_revoked_device():
    assert decisions.publish_decision(device(), client_id="device-b", topic="tx/device-a/telemetry").reason == (
        "client_id_mismatch"
    )
    assert not decisions.publish_decision(device(status="revoked"), client_id="device-a", topic="tx/device-a/ack")
    assert not decisions.subscribe_decision(None, client_id="x", topic_filter="rx/x/#")


def test_matching_follows_mqtt_wildcards_and_keeps_dollar_topics_apart():
    assert pattern_matches("rx/+/command", "rx/device-a/command")
    assert not pattern_matches("rx/+/command", "rx/device-a/command/x")
    assert not pattern_matches("+/broker/log", "$SYS/broker/log")
    assert covers("rx/device-a/#", "rx/device-a/+") and covers("rx/device-a/#", "rx/device-a/#")
    assert not covers("rx/device-a/+", "rx/device-a/#")
    assert not covers("tx/+/telemetry", "#") and not covers("tx/+/telemetry", "tx/#")
    assert covers("tx/+/telemetry", "tx/+/telemetry") and covers("tx/+/telemetry", "tx/device-a/telemetry")
    assert not is_valid_filter("a/#/b") and not is_valid_filter("a/b+") and is_valid_filter("+/+/#")


def test_console_identities_have_their_narrow_rights(settings):
    by_name = {identity.username: identity for identity in console_identities_desired()}
    consumer = by_name[settings.MQTT_CONSUMER_USERNAME]
    commander = by_name[settings.MQTT_COMMANDER_USERNAME]
    ok = {"client_id": consumer.username}
    assert decisions.subscribe_decision(consumer, topic_filter="tx/+/telemetry", **ok)
    assert decisions.subscribe_decision(
        consumer, topic_filter=f"$share/{settings.MQTT_SHARED_SUBSCRIPTION_GROUP}/tx/+/ack", **ok
    )
    assert not decisions.subscribe_decision(consumer, topic_filter="#", **ok)
    assert not decisions.subscribe_decision(consumer, topic_filter="rx/+/command", **ok)
    assert not decisions.publish_decision(consumer, topic="rx/device-a/command", **ok)
    ok = {"client_id": commander.username}
    assert decisions.publish_decision(commander, topic="rx/device-a/credentials", **ok)
    assert not decisions.publish_decision(commander, topic="tx/device-a/telemetry", **ok)
    assert not decisions.subscribe_decision(commander, topic_filter="rx/device-a/#", **ok)
    assert decisions.connect_decision(
        commander, username=commander.username, password=settings.MQTT_COMMANDER_PASSWORD, client_id=commander.username
    )
    assert not decisions.connect_decision(
        commander, username=commander.username, password="guess", client_id=commander.username
    )


@pytest.mark.django_db
def test_the_desired_state_follows_the_database(operator, support):
    row = DeviceFactory(client_id="device-state-1")
    assert identity_desired("device-state-1").may_connect is False  # no credential yet
    secret = services.credential_issue(actor=operator, device=row).password
    identity = identity_desired("device-state-1")
    assert connect(identity, password=secret, client_id="device-state-1", username="device-state-1")
    services.device_quarantine(actor=support, device=Device.objects.get(pk=row.pk), reason="odd")
    identity = identity_desired("device-state-1")
    assert identity.status == "quarantined" and identity.grants.publish == ("tx/device-state-1/ack",)
    services.device_revoke(actor=support, device=Device.objects.get(pk=row.pk), reason="stolen")
    assert not connect(
        identity_desired("device-state-1"), password=secret, client_id="device-state-1", username="device-state-1"
    )
    assert identity_desired("not-a-device-name") is None  # outside the prefix rule: never looked up
    assert identity_desired("device-nobody") is None
