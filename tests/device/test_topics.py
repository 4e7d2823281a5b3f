"""The library's topic scheme: one spelling of the channels, identical to the console's (security/topics.py)."""

import pytest

from fleetkeeper_device import topics
from fleetkeeper_device.topics import TopicError, TopicScheme
from security import topics as console_topics


def test_the_device_publishes_on_a_fixed_set_of_tx_channels_and_subscribes_to_its_own_rx_subtree():
    scheme = TopicScheme()
    assert scheme.telemetry("device-1") == "tx/device-1/telemetry"
    assert scheme.ack("device-1") == "tx/device-1/ack"
    assert scheme.rx_filter("device-1") == "rx/device-1/#"
    with pytest.raises(TopicError, match="not a device publish channel"):
        scheme.tx("device-1", "everything")


def test_the_library_and_the_console_spell_every_topic_the_same(settings):
    settings.MQTT_TOPIC_TX_PREFIX, settings.MQTT_TOPIC_RX_PREFIX = "up", "down"
    scheme = TopicScheme(tx_prefix="up", rx_prefix="down")
    assert topics.DEVICE_PUBLISH_CHANNELS == console_topics.TX_CHANNELS
    assert topics.DEVICE_RECEIVE_CHANNELS == console_topics.RX_CHANNELS
    for channel in topics.DEVICE_PUBLISH_CHANNELS:
        assert scheme.tx("device-7", channel) == console_topics.tx_topic("device-7", channel)
    for channel in topics.DEVICE_RECEIVE_CHANNELS:
        assert scheme.rx("device-7", channel) == console_topics.rx_topic("device-7", channel)
    assert scheme.rx_filter("device-7") == console_topics.device_rx_filter("device-7")


@pytest.mark.parametrize("client_id", ["a/b", "#", "dev+1", "$SYS", "with space", ""])
def test_client_ids_that_would_change_the_meaning_of_a_topic_are_refused(client_id):
    with pytest.raises(TopicError):
        TopicScheme().telemetry(client_id)


def test_prefixes_are_checked_and_must_differ():
    with pytest.raises(TopicError, match="must differ"):
        TopicScheme(tx_prefix="x", rx_prefix="x")
    with pytest.raises(TopicError, match="topic syntax"):
        TopicScheme(tx_prefix="t/x")


@pytest.mark.parametrize(
    "topic, parsed",
    [
        ("tx/device-1/telemetry", ("tx", "device-1", "telemetry")),
        ("rx/device-1/credentials", ("rx", "device-1", "credentials")),
        ("tx/device-1/command", None),
        ("rx/device-1/telemetry", None),
        ("tx/device-1/telemetry/extra", None),
        ("tx//telemetry", None),
        ("$SYS/broker/uptime", None),
    ],
)
def test_parse_accepts_exactly_the_known_channels(topic, parsed):
    assert TopicScheme().parse(topic) == (tuple(parsed) if parsed else None)
