"""The Django admin only shows: every change goes through the services (validated, audited, enforced)."""

import pytest
from django.contrib import admin
from django.urls import reverse

from tests.factories import DeviceFactory, UserFactory

pytestmark = pytest.mark.django_db

CONSOLE_APPS = {"devices", "security"}


def console_models():
    return [m for m in admin.site._registry if m._meta.app_label in CONSOLE_APPS]


@pytest.fixture
def superuser_client(client):
    client.force_login(UserFactory(username="root", is_staff=True, is_superuser=True))
    return client


def test_every_console_model_in_the_admin_lists_but_cannot_be_added_changed_or_deleted(superuser_client):
    device = DeviceFactory(client_id="device-admin-1")
    assert len(console_models()) >= 8
    for model in console_models():
        opts = model._meta
        changelist = reverse(f"admin:{opts.app_label}_{opts.model_name}_changelist")
        assert superuser_client.get(changelist).status_code == 200, changelist
        add = reverse(f"admin:{opts.app_label}_{opts.model_name}_add")
        assert superuser_client.get(add).status_code == 403, add
    delete = reverse("admin:devices_device_delete", args=[device.pk])
    assert superuser_client.post(delete, {"post": "yes"}).status_code == 403
    device.refresh_from_db()
