from django.conf import settings
from django.db import models

from .validators import validate_client_id, validate_mac


class DeviceModel(models.Model):
    """A product line. Carries the firmware versions detection compares devices against."""

    name = models.CharField(max_length=100, unique=True)
    manufacturer = models.CharField(max_length=100, blank=True)
    description = models.TextField(blank=True)
    latest_firmware = models.CharField(max_length=64, blank=True, help_text="Newest released version.")
    minimum_firmware = models.CharField(
        max_length=64, blank=True, help_text="Oldest version without known vulnerabilities."
    )
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]
        verbose_name = "device model"

    def __str__(self) -> str:
        return self.name


class DeviceGroup(models.Model):
    """Operator-defined grouping (site, customer, batch). Named DeviceGroup so it is never confused
    with django.contrib.auth's Group, which holds the console's roles."""

    name = models.CharField(max_length=100, unique=True)
    description = models.TextField(blank=True)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]
        verbose_name = "group"

    def __str__(self) -> str:
        return self.name


class Device(models.Model):
    class Status(models.TextChoices):
        ACTIVE = "active", "Active"
        QUARANTINED = "quarantined", "Quarantined"
        REVOKED = "revoked", "Revoked"
        DECOMMISSIONED = "decommissioned", "Decommissioned"

    client_id = models.CharField(
        max_length=128,
        unique=True,
        validators=[validate_client_id],
        help_text="MQTT client id and broker username; must follow the fleet prefix rule.",
    )
    name = models.CharField(max_length=200, blank=True)
    model = models.ForeignKey(DeviceModel, null=True, blank=True, on_delete=models.PROTECT, related_name="devices")
    groups = models.ManyToManyField(DeviceGroup, blank=True, related_name="devices")
    serial = models.CharField(max_length=100, blank=True)
    mac = models.CharField("MAC address", max_length=17, blank=True, validators=[validate_mac])
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ACTIVE)
    firmware_version = models.CharField(max_length=64, blank=True)
    last_seen = models.DateTimeField(null=True, blank=True)
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["client_id"]
        indexes = [
            models.Index(fields=["status", "client_id"]),
            # The list filtered by model and status, sorted by last seen (the dashboard's slowest query).
            models.Index(fields=["model", "status", "last_seen"]),
            models.Index(fields=["last_seen"]),
            models.Index(fields=["firmware_version"]),
            models.Index(fields=["name"]),
            models.Index(fields=["serial"]),
            models.Index(fields=["mac"]),
            models.Index(fields=["created"]),
        ]
        permissions = [
            ("import_device", "Can import devices from CSV"),
            ("export_device", "Can export devices to CSV"),
            ("issue_credentials", "Can issue device credentials"),
            ("rotate_credentials", "Can rotate device credentials"),
            ("revoke_device", "Can revoke a device"),
            ("quarantine_device", "Can quarantine a device"),
            ("reinstate_device", "Can reinstate a device"),
        ]

    def __str__(self) -> str:
        return self.client_id


class ImportJob(models.Model):
    """A CSV import. Runs as a Celery task so large files show progress; all rows or none."""

    class State(models.TextChoices):
        PENDING = "pending", "Waiting for a worker"
        VALIDATING = "validating", "Validating"
        IMPORTING = "importing", "Importing"
        SUCCEEDED = "succeeded", "Imported"
        FAILED = "failed", "Rejected"

    filename = models.CharField(max_length=255)
    content = models.TextField()
    state = models.CharField(max_length=16, choices=State.choices, default=State.PENDING)
    total_rows = models.PositiveIntegerField(default=0)
    processed_rows = models.PositiveIntegerField(default=0)
    imported_rows = models.PositiveIntegerField(default=0)
    errors = models.JSONField(default=list, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL)
    created = models.DateTimeField(auto_now_add=True)
    finished = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created"]

    def __str__(self) -> str:
        return f"import {self.pk} ({self.filename})"

    @property
    def done(self) -> bool:
        return self.state in {self.State.SUCCEEDED, self.State.FAILED}

    @property
    def percent(self) -> int:
        return int(100 * self.processed_rows / self.total_rows) if self.total_rows else (100 if self.done else 0)
