"""Fixtures for the whole suite. Real servers (Redis, a Celery worker; later Mosquitto) run on free ports."""

from urllib.parse import urlparse

import pytest
from django.conf import settings
from django.contrib.auth.models import Group

from tests.factories import UserFactory
from tests.support.servers import CeleryWorker, RedisServer

ROLES = ("admin", "operator", "support", "auditor")


@pytest.fixture(scope="session", autouse=True)
def redis_server():
    """Every test session has a real Redis: the app enqueues Celery tasks on commit."""
    server = RedisServer(urlparse(settings.REDIS_URL).port).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def celery_worker(django_db_setup, django_db_blocker, redis_server):
    """A real worker process. Tests that use it need committed data: mark them transactional_db.

    One per module, stopped at the module's end: a worker kept for the whole session would still be consuming the
    default queue while later modules run their own worker (with their own settings), and take some of their tasks."""
    from django.db import connection

    with django_db_blocker.unblock():
        db_name = connection.settings_dict["NAME"]
    worker = CeleryWorker(db_name=str(db_name)).start()
    yield worker
    worker.stop()


def make_user(role: str | None, username: str | None = None):
    user = UserFactory(username=username or f"{role or 'norole'}-user")
    if role:
        user.groups.add(Group.objects.get(name=role))
    return user


@pytest.fixture
def user_with_role(db):
    return make_user


@pytest.fixture
def operator(db):
    return make_user("operator")


@pytest.fixture
def admin_user_role(db):
    return make_user("admin")


@pytest.fixture
def support(db):
    return make_user("support")


@pytest.fixture
def auditor(db):
    return make_user("auditor")


@pytest.fixture
def operator_client(client, operator):
    client.force_login(operator)
    return client


# --- broker enforcement: a real Mosquitto with the project's rendered config ---------------------------------
# The session gets its own broker port and directory (inherited by a Celery worker through the environment);
# each test that asks for `mosquitto` gets a fresh broker there, started from the files the project renders.

import os  # noqa: E402
import shutil as _shutil  # noqa: E402

from fleet.ports import free_port, reserve  # noqa: E402
from tests.support.broker import MosquittoServer  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def mqtt_test_settings(tmp_path_factory):
    from django.test.utils import override_settings

    # The broker stops and starts on these ports test after test: nothing else in this session may take them.
    port = free_port()
    reserve(port)
    tls_port = free_port()
    reserve(tls_port)
    broker_dir = tmp_path_factory.mktemp("mosquitto")
    os.environ.update(MQTT_PORT=str(port), MQTT_TLS_PORT=str(tls_port), MQTT_BROKER_DIR=str(broker_dir))
    override = override_settings(MQTT_PORT=port, MQTT_TLS_PORT=tls_port, MQTT_BROKER_DIR=broker_dir)
    override.enable()
    yield {"port": port, "dir": broker_dir}
    override.disable()


@pytest.fixture
def render_broker_files(db):
    """Write the project's rendered policy where the broker reads it; returns the RenderedPolicy."""
    from security.brokers import get_adapter
    from security.services import policy_desired

    def render():
        policy = policy_desired()
        get_adapter().write(policy)
        return policy

    return render


@pytest.fixture
def mosquitto(mqtt_test_settings, render_broker_files):
    """A fresh Mosquitto on the session's broker port, started with the rendered config; stopped afterwards."""
    broker_dir = mqtt_test_settings["dir"]
    render_broker_files()
    server = MosquittoServer(broker_dir, mqtt_test_settings["port"]).start()
    yield server
    server.stop()
    for child in broker_dir.iterdir():
        if child.is_dir():
            _shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


@pytest.fixture
def devices():
    """Start real devices (fleetkeeper_device.DeviceClient) on the test broker: ``devices(client_id, secret, **kw)``;
    quick reconnects, stopped at the end of the test."""
    from fleetkeeper_device import Backoff, DeviceClient

    started = []

    def make(client_id, secret, **kwargs):
        kwargs.setdefault("backoff", Backoff(initial=0.2, maximum=1.0))
        kwargs.setdefault("stable_after", 1.0)
        device = DeviceClient(client_id, host="127.0.0.1", port=settings.MQTT_PORT, secret=secret, **kwargs)
        started.append(device)
        device.start()
        return device

    yield make
    for device in started:
        device.stop()
