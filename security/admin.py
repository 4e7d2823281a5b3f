"""Admin: broker enforcement records are read-only here (changes go through the services, which audit them)."""

from django.contrib import admin

from fleet.admin import ReadOnlyAdmin

from .models import BrokerState, DeviceCredential, EnforcementChange


@admin.register(DeviceCredential)
class DeviceCredentialAdmin(ReadOnlyAdmin):
    list_display = ("device", "source", "issued_at", "issued_by")
    list_select_related = ("device", "issued_by")
    search_fields = ("device__client_id",)
    # Never the hash: it is the broker's secret material.
    fields = ("device", "source", "issued_at", "issued_by")


@admin.register(EnforcementChange)
class EnforcementChangeAdmin(ReadOnlyAdmin):
    list_display = ("id", "kind", "client_id", "state", "attempts", "created", "applied_at")
    list_filter = ("state", "kind")
    search_fields = ("client_id",)


@admin.register(BrokerState)
class BrokerStateAdmin(ReadOnlyAdmin):
    list_display = ("adapter", "reachable", "last_checked", "last_reload", "last_probe_ok")
