"""Admin: broker enforcement records are read-only here (changes go through the services, which audit them)."""

from django.contrib import admin

from fleet.admin import ReadOnlyAdmin

from .models import Alert, BrokerState, DeviceActivity, DeviceCredential, EnforcementChange


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


@admin.register(Alert)
class AlertAdmin(ReadOnlyAdmin):
    """Alerts are worked on the alert pages (acknowledge, resolve with a comment: audited); here they only show."""

    list_display = ("id", "kind", "severity", "client_id", "state", "occurrences", "first_seen", "last_seen")
    list_filter = ("kind", "severity", "state")
    search_fields = ("client_id", "summary")
    show_full_result_count = False


@admin.register(DeviceActivity)
class DeviceActivityAdmin(ReadOnlyAdmin):
    list_display = ("client_id", "messages", "malformed", "last_message_at", "last_status_at")
    search_fields = ("client_id",)
    show_full_result_count = False
