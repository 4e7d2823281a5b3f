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


@pytest.fixture(scope="session")
def celery_worker(django_db_setup, django_db_blocker, redis_server):
    """A real worker process. Tests that use it need committed data: mark them transactional_db."""
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
