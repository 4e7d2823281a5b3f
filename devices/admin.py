"""The Django admin shows the inventory read-only: every change goes through the console's services,
which validate, audit and enforce on the broker. An admin form would bypass all three."""

from django.contrib import admin

from fleet.admin import ReadOnlyAdmin

from .models import Device, DeviceGroup, DeviceModel, ImportJob


@admin.register(Device)
class DeviceAdmin(ReadOnlyAdmin):
    list_display = ("client_id", "name", "model", "status", "firmware_version", "last_seen")
    list_filter = ("status", "model")
    search_fields = ("client_id", "name", "serial", "mac")
    list_select_related = ("model",)
    show_full_result_count = False


@admin.register(DeviceModel)
class DeviceModelAdmin(ReadOnlyAdmin):
    list_display = ("name", "manufacturer", "latest_firmware", "minimum_firmware")


@admin.register(DeviceGroup)
class DeviceGroupAdmin(ReadOnlyAdmin):
    list_display = ("name",)


@admin.register(ImportJob)
class ImportJobAdmin(ReadOnlyAdmin):
    list_display = ("id", "filename", "state", "total_rows", "imported_rows", "created_by", "created")
    exclude = ("content",)
