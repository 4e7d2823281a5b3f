"""The RabbitMQ cluster for the tests that enforce through it (test_broker_attacks.py, test_rabbitmq.py).

One two-node cluster per pytest process: it takes ~30 s to boot here, so the tests that use it share it. They carry
``xdist_group("rabbitmq")`` and scripts/test.sh runs xdist with ``--dist loadgroup``: all of them go to one worker,
and only that worker boots a cluster."""

import uuid

import paho.mqtt.client as mqtt
import pytest

from tests.support.broker import MqttClient

MANAGEMENT_USER = "fleetkeeper-test"
MANAGEMENT_PASSWORD = uuid.uuid4().hex

RABBITMQ = [pytest.mark.slow, pytest.mark.xdist_group("rabbitmq"), pytest.mark.django_db(transaction=True)]
"""The marks of every test that asks for ``rabbit``: transactional, because the hook answers from its own thread
(its own database connection), which sees only what the test committed."""


@pytest.fixture(scope="session")
def cluster():
    from security.brokers.rabbitmq_local import RabbitCluster
    from tests.support.hook import HookServer

    hook = HookServer().start()
    cluster = RabbitCluster(
        2, hook_url=hook.url("rabbitmq"), management_user=MANAGEMENT_USER, management_password=MANAGEMENT_PASSWORD
    ).start()
    yield cluster
    cluster.stop()
    hook.stop()


@pytest.fixture
def rabbit(cluster, settings):
    """The console enforcing through the cluster (``BROKER_BACKEND=rabbitmq``): it knows node A's management API,
    and its canary, verifier and consumer log in at node A. Node A is returned, with ``client(...)`` to make
    MQTT 3.1.1 clients (``node=1`` for node B), closed after the test."""
    from django.apps import apps

    from fleet.celery import app as celery_app
    from security.enforcement import cache
    from security.roles import roles_sync

    roles_sync(apps)  # a transactional test before this one flushed the tables, roles included
    cache.invalidate_all()  # a new database for each test, the same Redis: no answer cached by an earlier test
    node_a = cluster.nodes[0]
    settings.BROKER_BACKEND = "rabbitmq"  # the hook answers only the broker the console enforces through
    settings.RABBITMQ_MANAGEMENT_URLS = [node_a.management_url]
    settings.RABBITMQ_MANAGEMENT_USER = MANAGEMENT_USER
    settings.RABBITMQ_MANAGEMENT_PASSWORD = MANAGEMENT_PASSWORD
    settings.MQTT_HOST, settings.MQTT_PORT = "127.0.0.1", node_a.mqtt_port
    clients = []

    def client(client_id, username=None, password=None, node=0):
        made = MqttClient(
            cluster.nodes[node].mqtt_port,
            client_id=client_id,
            username=username,
            password=password,
            protocol=mqtt.MQTTv311,
        )
        clients.append(made)
        return made

    node_a.client = client
    yield node_a
    for made in clients:
        made.close()
    celery_app.control.purge()  # the changes' commits queued apply tasks: no worker runs in these modules
