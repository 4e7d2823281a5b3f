"""What only a cluster has, on a real two-node RabbitMQ whose HTTP auth backend asks the console's hook
(tests/security/conftest.py): a device on node B reached and dropped through node A, the management API's kick and
its outage, a node stopped during a revocation, the decision cache's Redis restarted, the hook's refusals as events
and alerts, the consumer and the commander on MQTT 3.1.1. The attack cases every broker must pass are
tests/security/test_broker_attacks.py. Clients connect to node A unless a test says otherwise."""

import time
import uuid

import pytest
from django.conf import settings

from devices.models import Device
from fleet.ports import free_port
from security import revocation, services
from security.brokers import rabbitmq
from security.brokers.base import BrokerUnavailable
from security.detection.consumer import Consumer
from security.detection.hook_monitor import HookEventMonitor
from security.enforcement import events
from security.models import Alert, AuditEvent, DeviceAction, DeviceActivity, EnforcementChange
from security.rotation import commander
from tests.factories import DeviceFactory
from tests.security.conftest import RABBITMQ
from tests.security.test_payload_encryption import telemetry
from tests.security.test_revocation import api
from tests.support.servers import RedisServer
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.integration, *RABBITMQ]


def device_with_secret(operator, client_id):
    row = DeviceFactory(client_id=client_id)
    return row, services.credential_issue(actor=operator, device=row).password


def consumer(rabbit, *filters):
    reader = rabbit.client(
        settings.MQTT_CONSUMER_USERNAME, settings.MQTT_CONSUMER_USERNAME, settings.MQTT_CONSUMER_PASSWORD
    )
    assert reader.connect() == 0
    assert reader.subscribe(*filters) == [1] * len(filters)
    return reader


def test_a_device_on_node_b_publishes_and_the_consumer_on_node_a_receives(rabbit, operator):
    _, secret = device_with_secret(operator, "device-rq-1")
    reader = consumer(rabbit, "tx/+/telemetry")
    device = rabbit.client("device-rq-1", "device-rq-1", secret, node=1)
    assert device.connect() == 0
    assert device.subscribe("rx/device-rq-1/#") == [1]
    nonce = uuid.uuid4().hex
    device.publish("tx/device-rq-1/telemetry", nonce)
    assert reader.wait_for(lambda ms: any(m.payload == nonce.encode() for m in ms), timeout=5)


def test_the_kick_asked_of_node_a_drops_a_session_on_node_b(rabbit, operator, support):
    """The adapter's disconnect verb: a deny does not end a session that is open, the management API does, asked of
    one node wherever the session is; asked again, it says the device is not connected."""
    row, secret = device_with_secret(operator, "device-rq-r")
    session = rabbit.client("device-rq-r", "device-rq-r", secret, node=1)  # connected to node B
    assert session.connect() == 0
    services.device_revoke(actor=support, device=Device.objects.get(pk=row.pk), reason="stolen")
    started = time.monotonic()
    assert rabbitmq.disconnect(["device-rq-r"]) == {"device-rq-r": "dropped"}
    assert session.wait_disconnected(5)
    print(f"kick to disconnect: {(time.monotonic() - started) * 1000:.1f} ms")
    assert rabbit.client("device-rq-r", "device-rq-r", secret, node=1).connect() != 0
    # (the management API may list a closed connection for a moment longer: then it is dropped again, harmlessly)
    assert rabbitmq.disconnect(["device-rq-r"])["device-rq-r"] in ("not connected", "dropped")


def test_what_the_cluster_asked_and_the_hook_refused_is_an_event_for_detection(rabbit, operator):
    _, secret = device_with_secret(operator, "device-rq-c")
    start = events.latest_id()
    assert rabbit.client("device-rq-c", "device-rq-c", "wrong").connect() != 0
    device = rabbit.client("device-rq-c", "device-rq-c", secret, node=1)
    assert device.connect() == 0
    device.client.publish("tx/device-rq-z/telemetry", "forged", qos=1)  # no PUBACK comes
    assert device.wait_disconnected(5)
    kinds = [(e.check, e.kind, e.username, e.topic) for e in events.read(start)]
    assert kinds == [
        ("user", "bad_secret", "device-rq-c", ""),
        ("topic", "publish_denied", "device-rq-c", "tx/device-rq-z/telemetry"),
    ]


# --- BROKER_BACKEND=rabbitmq: the API's revocation through the outbox, the kick and the verifier -------------------


def test_an_api_revocation_drops_the_device_on_node_b_and_is_verified(rabbit, operator, support):
    _, secret = device_with_secret(operator, "device-rq-api")
    services.enforcement_apply(coalesce=False)  # what the worker does with the credential's change
    session = rabbit.client("device-rq-api", "device-rq-api", secret, node=1)
    assert session.connect() == 0
    response = api(support).post("/api/v1/devices/device-rq-api/revoke/", {"reason": "stolen"}, format="json")
    assert response.status_code == 202, response.content
    record = DeviceAction.objects.get(pk=response.json()["id"])
    assert record.state == "pending"
    result = services.enforcement_apply(coalesce=False)  # the worker's apply task
    assert result.probe.ok, result.probe
    assert result.timings["sessions"] == {"device-rq-api": "dropped"}
    assert session.wait_disconnected(5)
    assert EnforcementChange.objects.get(pk=record.change_id).state == "applied"
    assert revocation.device_action_verify_pending() == {"verified": 1, "failed": 0, "waiting": 0}
    record.refresh_from_db()
    assert record.state == "verified"
    assert record.evidence["connect_attempt"]["code"] != 0 and record.evidence["live_connections"] == 0
    assert record.evidence["purge"]["state"] == "done"
    assert AuditEvent.objects.filter(action="device.revoke_verified", object_id="device-rq-api").exists()
    assert rabbit.client("device-rq-api", "device-rq-api", secret, node=1).connect() != 0


def test_a_quarantine_through_the_api_keeps_the_repair_path_after_the_kick(rabbit, operator, support):
    _, secret = device_with_secret(operator, "device-rq-apq")
    session = rabbit.client("device-rq-apq", "device-rq-apq", secret)
    assert session.connect() == 0
    response = api(support).post("/api/v1/devices/device-rq-apq/quarantine/", {"reason": "odd"}, format="json")
    assert response.status_code == 202, response.content
    services.enforcement_apply(coalesce=False)
    assert session.wait_disconnected(5), "a live session keeps its rights on RabbitMQ: the quarantine must end it"
    again = rabbit.client("device-rq-apq", "device-rq-apq", secret)
    assert again.connect() == 0 and again.subscribe("rx/device-rq-apq/#") == [1]
    again.publish("tx/device-rq-apq/ack", "repair ack")
    assert again.is_connected
    assert revocation.device_action_verify_pending()["verified"] == 1


def test_management_api_down_delays_the_kick_and_loses_nothing(rabbit, operator, support, settings):
    row, secret = device_with_secret(operator, "device-rq-down")
    session = rabbit.client("device-rq-down", "device-rq-down", secret)
    assert session.connect() == 0
    working = settings.RABBITMQ_MANAGEMENT_URLS
    settings.RABBITMQ_MANAGEMENT_URLS = [f"http://127.0.0.1:{free_port()}"]  # nothing listens there
    services.device_revoke(actor=support, device=Device.objects.get(pk=row.pk), reason="stolen")
    change = EnforcementChange.objects.filter(client_id="device-rq-down", kind="device.revoke").latest("id")
    with pytest.raises(BrokerUnavailable):
        services.enforcement_apply(coalesce=False)
    change.refresh_from_db()
    assert change.state == "pending" and change.attempts == 1 and "management" in change.last_error
    # The deny is in force for every new question meanwhile: the device cannot connect again.
    assert rabbit.client("device-rq-down", "device-rq-down", secret, node=1).connect() != 0
    settings.RABBITMQ_MANAGEMENT_URLS = working
    services.broker_reconcile(trigger="test")  # what beat runs every minute (or the task's own retry)
    change.refresh_from_db()
    assert change.state == "applied"
    assert session.wait_disconnected(5)


def test_the_clusters_refusals_raise_alerts_through_the_adapters_events(rabbit, operator, settings):
    """Detection on a hook broker: what the hook refused (adapter.events()) becomes the alerts Mosquitto's log
    lines raise: brute force against one username, a publish outside the device's own topics, client-id misuse."""
    settings.DETECTION_AUTH_FAILURES_BRUTE_FORCE = 3
    _, secret = device_with_secret(operator, "device-rq-det")
    monitor = HookEventMonitor()
    for _ in range(3):
        assert rabbit.client("device-rq-det", "device-rq-det", "guess").connect() != 0
    assert rabbit.client("device-rq-elsewhere", "device-rq-det", secret).connect() != 0
    device = rabbit.client("device-rq-det", "device-rq-det", secret, node=1)
    assert device.connect() == 0
    device.client.publish("tx/device-rq-victim/telemetry", "forged", qos=1)  # no PUBACK comes
    assert device.wait_disconnected(5)
    monitor.poll()
    brute = Alert.objects.get(kind="auth_failures")
    assert brute.evidence["brute_force"] is True and brute.evidence["username"] == "device-rq-det"
    forged = Alert.objects.get(kind="publish_denied")
    assert forged.device.client_id == "device-rq-det"
    assert forged.evidence["samples"][0]["topic"] == "tx/device-rq-victim/telemetry"
    assert Alert.objects.filter(kind="client_id_conflict", device__client_id="device-rq-det").exists()
    assert monitor.poll() == []  # each event is read once


def test_the_consumer_reads_the_fleet_and_the_hooks_refusals_from_the_cluster(rabbit, operator, settings):
    """The console's consumer as the worker runs it, on a broker without shared subscriptions or a $SYS log: plain
    subscriptions on node A receive what a device on node B publishes, and the hook's refusals become alerts with
    nobody calling the monitor."""
    settings.DETECTION_AUTH_FAILURES_BRUTE_FORCE = 3
    _, secret = device_with_secret(operator, "device-rq-con")
    running = Consumer(replica=1).start()
    try:
        assert wait_until(running.connected, 10), "the consumer never subscribed on the cluster"
        assert running.monitor is None, "no $SYS log to read on RabbitMQ"
        device = rabbit.client("device-rq-con", "device-rq-con", secret, node=1)
        assert device.connect() == 0
        for seq in range(1, 6):
            device.publish("tx/device-rq-con/telemetry", telemetry(seq))
        assert wait_until(lambda: DeviceActivity.objects.filter(client_id="device-rq-con", telemetry=5).exists(), 10), (
            "the telemetry published on node B never reached the console"
        )
        for _ in range(3):
            assert rabbit.client("device-rq-con", "device-rq-con", "guess").connect() != 0
        assert wait_until(lambda: Alert.objects.filter(kind="auth_failures").exists(), 10)
        assert Alert.objects.get(kind="auth_failures").evidence["username"] == "device-rq-con"
        assert running.stats.broker_events >= 3
    finally:
        running.stop()


def test_two_consumer_replicas_are_refused_on_a_broker_without_shared_subscriptions(rabbit, settings):
    settings.MQTT_CONSUMER_REPLICAS = 2
    with pytest.raises(ValueError, match="no shared subscriptions"):
        Consumer(replica=1)


def test_the_commander_reaches_a_device_over_mqtt_3_1_1(rabbit, operator):
    """Rotation, renewals and firmware offers go out through the commander: RabbitMQ 3.10 speaks no MQTT 5."""
    _, secret = device_with_secret(operator, "device-rq-cmd")
    device = rabbit.client("device-rq-cmd", "device-rq-cmd", secret, node=1)
    assert device.connect() == 0 and device.subscribe("rx/device-rq-cmd/#") == [1]
    outcome = commander.publish([("rx/device-rq-cmd/firmware", b"offer")], timeout=5)
    assert outcome.acknowledged == [True]
    assert device.wait_for(lambda ms: any(m.payload == b"offer" for m in ms), timeout=5)


@pytest.mark.soak
def test_a_node_stopped_during_a_revocation_loses_nothing(cluster, rabbit, operator, support):
    """The console knows node A's management API; node A stops; a device on node B is revoked. The deny is in force
    at once, the kick waits (pending, retried), and when node A returns the reconcile drops the session.

    In `make soak`: a RabbitMQ 3.10 node that rejoins its cluster takes ~110 s to boot here (measured 2026-12-03)."""
    _, secret = device_with_secret(operator, "device-rq-node")
    session = rabbit.client("device-rq-node", "device-rq-node", secret, node=1)
    assert session.connect() == 0
    node_a = cluster.nodes[0]
    node_a.stop(keep_dir=True, keep_epmd=True)
    try:
        response = api(support).post("/api/v1/devices/device-rq-node/revoke/", {"reason": "stolen"}, format="json")
        assert response.status_code == 202, response.content
        with pytest.raises(BrokerUnavailable):
            services.enforcement_apply(coalesce=False)
        change = EnforcementChange.objects.get(pk=DeviceAction.objects.get(pk=response.json()["id"]).change_id)
        assert change.state == "pending" and change.attempts == 1
        assert session.is_connected  # nobody could kick it yet
        assert rabbit.client("device-rq-node", "device-rq-node", secret, node=1).connect() != 0
    finally:
        node_a.start(timeout=240)
    services.broker_reconcile(trigger="test")
    change.refresh_from_db()
    assert change.state == "applied"
    assert session.wait_disconnected(5)
    for node in (0, 1):
        assert rabbit.client("device-rq-node", "device-rq-node", secret, node=node).connect() != 0


def test_a_restarted_decision_cache_lets_no_revoked_device_in(rabbit, operator, support, settings):
    """The decision cache's Redis goes away while a device is revoked, and comes back empty (no persistence): the
    database answered meanwhile, the cache answers afresh after, and the device never gets back in."""
    server = RedisServer(free_port()).start()
    try:
        settings.ENFORCEMENT_CACHE_URL = server.url
        _, secret = device_with_secret(operator, "device-rq-redis")
        assert rabbit.client("device-rq-redis", "device-rq-redis", secret).connect() == 0  # cached: allowed
        server.stop(keep_dir=True)
        response = api(support).post("/api/v1/devices/device-rq-redis/revoke/", {"reason": "stolen"}, format="json")
        assert response.status_code == 202, response.content
        assert rabbit.client("device-rq-redis", "device-rq-redis", secret, node=1).connect() != 0
        server.start()
        assert rabbit.client("device-rq-redis", "device-rq-redis", secret).connect() != 0
        assert services.enforcement_apply(coalesce=False).probe.ok
        assert rabbit.client("device-rq-redis", "device-rq-redis", secret, node=1).connect() != 0
    finally:
        server.stop()
