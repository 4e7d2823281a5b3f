"""What the real Mosquitto enforces with the project's rendered policy: judged by what is delivered and refused,
never by SUBACK (acl_file grants every SUBSCRIBE and filters at delivery; see mosquitto-notes.md)."""

import uuid

import pytest
from django.conf import settings

from security import services
from security.enforcement.secrets import hash_secret
from security.models import DeviceCredential
from tests.factories import DeviceFactory
from tests.support.broker import ConsoleClients, MqttClient, raw_connect_code

pytestmark = [pytest.mark.integration, pytest.mark.django_db]

SETTLE = 0.3  # how long a message that should not arrive is given to arrive anyway


def apply_now():
    """What the apply task does, run here: render, write, SIGHUP, canary probe."""
    result = services.enforcement_apply(coalesce=False)
    assert result is not None and result.probe is not None
    assert result.probe.ok, result.probe
    return result


def device_with_secret(operator, client_id=None, **kwargs):
    device = DeviceFactory(**({"client_id": client_id} if client_id else {}), **kwargs)
    issued = services.credential_issue(actor=operator, device=device)
    return device, issued.password


def connect(port, client_id, username=None, password=None, **kwargs):
    client = MqttClient(port, client_id=client_id, username=username, password=password, **kwargs)
    code = client.connect()
    assert code == 0, f"{username} refused with {code}"
    return client


def consumer(port):
    """The console: reads tx/+/... as the consumer identity, sends rx/<id>/... as the commander identity."""
    console = ConsoleClients(port)
    assert console.connect() == 0
    return console


@pytest.fixture
def fleet(mosquitto, operator):
    """Two active devices with console-issued secrets, live on the broker."""
    a, secret_a = device_with_secret(operator, "device-a")
    b, secret_b = device_with_secret(operator, "device-b")
    apply_now()
    clients = []

    def open_client(client_id, username=None, password=None, **kwargs):
        client = connect(mosquitto.port, client_id, username, password, **kwargs)
        clients.append(client)
        return client

    yield {"a": (a, secret_a), "b": (b, secret_b), "port": mosquitto.port, "open": open_client, "broker": mosquitto}
    for client in clients:
        client.close()


def test_anonymous_connection_is_refused(fleet):
    assert raw_connect_code(fleet["port"], client_id="device-a", username=None, password=None) != 0


def test_wrong_secret_is_refused(fleet):
    assert raw_connect_code(fleet["port"], client_id="device-a", username="device-a", password="not-the-secret") != 0


def test_console_issued_secret_connects(fleet):
    _, secret = fleet["a"]
    assert raw_connect_code(fleet["port"], client_id="device-a", username="device-a", password=secret) == 0


def test_username_hash_and_unknown_usernames_are_refused(fleet):
    _, secret = fleet["a"]
    for username in ("#", "+", "device-a/#", "$SYS", ""):
        assert raw_connect_code(fleet["port"], client_id="x", username=username, password=secret) != 0, username


def test_secret_used_with_another_client_id_cannot_act_as_that_id(fleet):
    """use_username_as_clientid: device A's secret presented with client id device-b is a session of device-a."""
    _, secret_a = fleet["a"]
    _, secret_b = fleet["b"]
    real_b = fleet["open"]("device-b", "device-b", secret_b)
    real_b.subscribe("rx/device-b/#")
    impostor = fleet["open"]("device-b", "device-a", secret_a)
    impostor.subscribe("rx/device-b/#")
    console = consumer(fleet["port"])
    try:
        console.publish("rx/device-b/command", b"for b only")
        assert real_b.wait_for(lambda msgs: any(m.payload == b"for b only" for m in msgs))
        assert not impostor.wait_for(lambda msgs: msgs, timeout=SETTLE)
        # B's session was not taken over by the impostor.
        assert real_b.is_connected
        assert "as device-a" in fleet["broker"].log()
    finally:
        console.close()


def test_device_a_sees_nothing_of_device_b_and_reaches_no_one_on_its_topics(fleet):
    _, secret_a = fleet["a"]
    _, secret_b = fleet["b"]
    a = fleet["open"]("device-a", "device-a", secret_a)
    b = fleet["open"]("device-b", "device-b", secret_b)
    console = consumer(fleet["port"])
    try:
        a.subscribe("rx/device-b/#", "tx/device-b/#", "tx/+/telemetry")
        b.subscribe("rx/device-b/#")
        console.subscribe("tx/+/telemetry", "tx/+/status")
        # B's own traffic flows (positive controls)...
        console.publish("rx/device-b/command", b"cmd-for-b")
        b.publish("tx/device-b/telemetry", b"telemetry-from-b")
        assert b.wait_for(lambda msgs: any(m.payload == b"cmd-for-b" for m in msgs))
        assert console.wait_for(lambda msgs: any(m.payload == b"telemetry-from-b" for m in msgs))
        # ...but A receives none of it,
        assert not a.wait_for(lambda msgs: msgs, timeout=SETTLE), a.topics()
        # and A's publishes on B's topics reach no one.
        a.publish("rx/device-b/command", b"forged-command")
        a.publish("tx/device-b/telemetry", b"forged-telemetry")
        a.publish("tx/device-b/status", b"forged-status")
        a.publish("tx/device-a/telemetry", b"a-own-telemetry")  # positive control, published last
        assert console.wait_for(lambda msgs: any(m.payload == b"a-own-telemetry" for m in msgs))
        assert b"forged-telemetry" not in console.payloads()
        assert b"forged-status" not in console.payloads()
        assert not b.wait_for(lambda msgs: any(m.payload == b"forged-command" for m in msgs), timeout=SETTLE)
    finally:
        console.close()


@pytest.mark.parametrize("topic_filter", ["#", "+/#", "$SYS/#"])
def test_wildcard_subscription_delivers_nothing_beyond_own_channels(fleet, topic_filter):
    _, secret_a = fleet["a"]
    _, secret_b = fleet["b"]
    a = fleet["open"]("device-a", "device-a", secret_a)
    b = fleet["open"]("device-b", "device-b", secret_b)
    monitor = fleet["open"]("fleetkeeper-monitor", settings.MQTT_MONITOR_USERNAME, settings.MQTT_MONITOR_PASSWORD)
    console = consumer(fleet["port"])
    try:
        monitor.subscribe("$SYS/broker/log/#")
        # SUBACK grants it (acl_file never refuses a SUBSCRIBE): that is why this test judges by delivery.
        a.subscribe(topic_filter)
        b.publish("tx/device-b/telemetry", b"b-telemetry")
        console.publish("rx/device-b/command", b"b-command")
        console.publish("rx/device-a/command", b"a-command")  # A's own channel: allowed for '#' and '+/#'
        # The broker publishes its log on $SYS/broker/log/... (the monitor sees it); a device never does.
        fleet["open"]("device-b", "device-b", secret_b).close()
        assert monitor.wait_for(lambda msgs: any(m.topic.startswith("$SYS/broker/log/") for m in msgs))
        if topic_filter != "$SYS/#":
            assert a.wait_for(lambda msgs: any(m.payload == b"a-command" for m in msgs))
        else:
            a.wait_for(lambda msgs: False, timeout=SETTLE)
        assert set(a.topics()) <= {"rx/device-a/command"}, a.topics()
    finally:
        console.close()


def test_oversize_publish_disconnects_the_sender(fleet):
    _, secret_a = fleet["a"]
    a = fleet["open"]("device-a", "device-a", secret_a)
    console = consumer(fleet["port"])
    try:
        console.subscribe("tx/+/telemetry")
        a.client.publish("tx/device-a/telemetry", b"x" * (settings.MQTT_MAX_PACKET_SIZE + 1), qos=0)
        assert a.wait_disconnected(timeout=3)
        assert a.disconnect_reason == 0x95  # "Packet too large"
        assert b"x" * 10 not in b"".join(console.payloads())
        assert "oversize packet" in fleet["broker"].log()
    finally:
        console.close()


def test_quarantine_leaves_only_the_repair_path(fleet, operator, support):
    device, secret = fleet["a"]
    a = fleet["open"]("device-a", "device-a", secret)
    a.subscribe("rx/device-a/#")
    console = consumer(fleet["port"])
    try:
        console.subscribe("tx/+/#")
        services.device_quarantine(actor=support, device=device, reason="suspicious traffic")
        apply_now()
        # The existing session and subscription stay; ACL changes apply to them at once.
        for channel in ("command", "config", "credentials", "firmware"):
            console.publish(f"rx/device-a/{channel}", f"to-{channel}".encode())
        for channel in ("telemetry", "status", "csr", "ack"):
            a.publish(f"tx/device-a/{channel}", f"from-{channel}".encode())
        assert a.wait_for(lambda msgs: {b"to-credentials", b"to-firmware"} <= {m.payload for m in msgs})
        assert console.wait_for(lambda msgs: any(m.payload == b"from-ack" for m in msgs))
        a.wait_for(lambda msgs: False, timeout=SETTLE)
        assert set(a.payloads()) == {b"to-credentials", b"to-firmware"}
        assert set(console.payloads()) == {b"from-ack"}
        # Reinstated, it gets everything back.
        services.device_reinstate(actor=operator, device=device, reason="cleaned")
        apply_now()
        a.publish("tx/device-a/telemetry", b"telemetry-again")
        assert console.wait_for(lambda msgs: any(m.payload == b"telemetry-again" for m in msgs))
    finally:
        console.close()


def test_revoked_device_is_dropped_and_cannot_reconnect(fleet, support):
    device, secret = fleet["a"]
    a = fleet["open"]("device-a", "device-a", secret)
    services.device_revoke(actor=support, device=device, reason="stolen")
    result = apply_now()
    assert "device-a" not in result.digest  # sanity: the digest is a hash, not a listing
    assert a.wait_disconnected(timeout=3)
    assert raw_connect_code(fleet["port"], client_id="device-a", username="device-a", password=secret) != 0
    assert not DeviceCredential.objects.filter(device=device).exists()
    # B is untouched.
    _, secret_b = fleet["b"]
    assert raw_connect_code(fleet["port"], client_id="device-b", username="device-b", password=secret_b) == 0


def test_reissuing_a_secret_disconnects_the_session_using_the_old_one(fleet, operator):
    device, old_secret = fleet["a"]
    _, secret_b = fleet["b"]
    a = fleet["open"]("device-a", "device-a", old_secret)
    b = fleet["open"]("device-b", "device-b", secret_b)
    issued = services.credential_issue(actor=operator, device=device)
    apply_now()
    assert a.wait_disconnected(timeout=3)
    assert b.is_connected  # a reload re-authenticates everyone, and drops only those whose credential changed
    assert raw_connect_code(fleet["port"], client_id="device-a", username="device-a", password=old_secret) != 0
    assert raw_connect_code(fleet["port"], client_id="device-a", username="device-a", password=issued.password) == 0


def test_operator_supplied_secret_works_on_the_broker(mosquitto, operator):
    device = DeviceFactory(client_id="device-own")
    secret = "Zq7-" + uuid.uuid4().hex + uuid.uuid4().hex[:8]
    services.credential_issue(actor=operator, device=device, secret=secret)
    apply_now()
    assert raw_connect_code(mosquitto.port, client_id="device-own", username="device-own", password=secret) == 0


def test_password_line_generated_by_python_is_accepted_at_any_iteration_count(mosquitto, operator):
    """The stored $7$ form is what the broker checks, whatever the iteration count of that line."""
    device = DeviceFactory(client_id="device-iter")
    DeviceCredential.objects.create(
        device=device, password_hash=hash_secret("s3cret-" * 6, iterations=101), issued_at=device.created
    )
    apply_now()
    assert raw_connect_code(mosquitto.port, client_id="x", username="device-iter", password="s3cret-" * 6) == 0


def test_canary_probe_fails_when_the_broker_does_not_enforce_the_policy(mosquitto):
    """The probe is not a rubber stamp: an allow-all ACL (what an empty file means) makes it fail."""
    import os
    import signal

    from security.brokers import get_adapter
    from security.services import policy_desired

    policy = policy_desired()
    adapter = get_adapter()
    assert adapter.probe(policy).ok
    (mosquitto.dir / "acl").write_text("topic readwrite #\npattern readwrite #\n")
    log_before = len(mosquitto.log())
    os.kill(int((mosquitto.dir / "mosquitto.pid").read_text()), signal.SIGHUP)
    assert mosquitto.wait_for_log("Reloading config", timeout=5, after=log_before), mosquitto.log()[-2000:]
    result = adapter.probe(policy)
    assert result.generation_loaded and result.allowed_delivered
    assert result.forbidden_delivered and not result.ok


def test_canary_probe_sees_that_the_broker_has_not_loaded_the_files(mosquitto, operator):
    """Files written but no reload: the probe's generation password is refused, so nothing is shown as applied."""
    from security.brokers import get_adapter
    from security.services import policy_desired

    services.credential_issue(actor=operator, device=DeviceFactory(client_id="device-unloaded"))
    policy = policy_desired()
    adapter = get_adapter()
    adapter.probe_timeout = 0.5
    assert adapter.write(policy)
    result = adapter.probe(policy)
    assert not result.generation_loaded and not result.ok and "not loaded" in result.error
    assert result.refused_credential_refused


def test_canary_probe_works_in_a_process_with_many_open_descriptors(mosquitto):
    """paho's own loop uses select(), which fails for descriptors >= 1024; the probe drives paho with epoll."""
    import socket

    from security.brokers import get_adapter
    from security.services import policy_desired

    held = [socket.socket() for _ in range(1100)]
    try:
        assert held[-1].fileno() >= 1024
        assert get_adapter().probe(policy_desired()).ok
    finally:
        for sock in held:
            sock.close()
