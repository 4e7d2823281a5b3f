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
    # Firmware registry (docs/firmware.md): once the model has releases, latest/minimum above and these flags are
    # derived from them by devices.firmware.services (version -> {"vulnerable", "advisory", "withdrawn"}), so
    # detection reads one row it already has instead of querying the registry per status message.
    firmware_flags = models.JSONField(default=dict, blank=True, editable=False)
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


# --- firmware registry (docs/firmware.md) ---------------------------------------------------------------------------


class FirmwareSigningKey(models.Model):
    """The Ed25519 key the registry signs image digests with. The private half is stored encrypted (PKCS#8 with the
    PKI passphrase, like the CA keys); only the public half is ever shown. One key is active; retired keys stay so
    releases signed with them can still be shown and verified."""

    key_id = models.CharField(max_length=64, unique=True)
    public_key_pem = models.TextField()
    private_key_encrypted = models.TextField(editable=False)
    active = models.BooleanField(default=True)
    created = models.DateTimeField(auto_now_add=True)
    created_by_label = models.CharField(max_length=150, blank=True)
    retired_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created"]
        verbose_name = "firmware signing key"
        constraints = [
            models.UniqueConstraint(fields=["active"], condition=models.Q(active=True), name="one_active_firmware_key")
        ]

    def __str__(self) -> str:
        return self.key_id


class FirmwareRelease(models.Model):
    """One signed image for one device model. The console computes size and SHA-256 of an uploaded image (or takes
    them, with the image's URL, from the firmware team) and signs the digest with the active key."""

    model = models.ForeignKey(DeviceModel, on_delete=models.PROTECT, related_name="firmware_releases")
    version = models.CharField(max_length=64)
    # Sortable form of the version (devices.firmware.versions.sort_key): lets the database order releases.
    version_sort = models.CharField(max_length=200, editable=False)
    stored_name = models.CharField(max_length=100, blank=True, help_text="Image file under FIRMWARE_STORAGE_DIR.")
    url = models.URLField(max_length=2048, blank=True, help_text="Where devices download an image hosted elsewhere.")
    size = models.PositiveBigIntegerField()
    sha256 = models.CharField(max_length=64)
    signature = models.CharField(max_length=88)
    key = models.ForeignKey(FirmwareSigningKey, on_delete=models.PROTECT, related_name="releases")
    notes = models.TextField(blank=True)
    released_at = models.DateTimeField(auto_now_add=True)
    released_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    released_by_label = models.CharField(max_length=150, blank=True)
    minimum_secure = models.BooleanField(
        default=False, help_text="Devices below this version are treated as insecure (critical alert)."
    )
    vulnerable = models.BooleanField(default=False)
    advisory = models.TextField(blank=True)
    vulnerable_at = models.DateTimeField(null=True, blank=True)
    withdrawn = models.BooleanField(default=False)
    withdrawn_reason = models.TextField(blank=True)
    withdrawn_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["model__name", "-version_sort"]
        verbose_name = "firmware release"
        constraints = [
            models.UniqueConstraint(fields=["model", "version_sort"], name="one_release_per_model_version"),
        ]
        indexes = [models.Index(fields=["model", "version"])]
        permissions = [
            ("offer_firmware", "Can offer firmware to devices"),
            ("withdraw_firmware", "Can withdraw a firmware release"),
            ("flag_firmware", "Can mark a firmware release known-vulnerable"),
        ]

    def __str__(self) -> str:
        return f"{self.model} {self.version}"


class FirmwareOffer(models.Model):
    """One firmware_offer message to one device: durable before it is published, then the device's answer."""

    class State(models.TextChoices):
        PENDING = "pending", "Waiting to be sent"
        DELIVERED = "delivered", "Sent; waiting for the device"
        ACCEPTED = "accepted", "Accepted by the device"
        REJECTED = "rejected", "Rejected by the device"
        FAILED = "failed", "Failed on the device"
        EXPIRED = "expired", "Arrived after its expiry"
        CANCELLED = "cancelled", "Cancelled"

    release = models.ForeignKey(FirmwareRelease, on_delete=models.PROTECT, related_name="offers")
    device = models.ForeignKey(Device, null=True, on_delete=models.SET_NULL, related_name="firmware_offers")
    client_id = models.CharField(max_length=128)
    command_id = models.CharField(max_length=64, unique=True)
    # Where the device downloads the image, fixed when the offer is made (the console's FIRMWARE_DOWNLOAD_BASE_URL
    # then, or the release's own URL), so every attempt sends the same message whichever worker sends it.
    url = models.URLField(max_length=2048)
    state = models.CharField(max_length=16, choices=State.choices, default=State.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True)
    detail = models.TextField(blank=True, help_text="The device's answer (its reason when it refused).")
    requested_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    requested_by_label = models.CharField(max_length=150, blank=True)
    created = models.DateTimeField(auto_now_add=True)
    delivered_at = models.DateTimeField(null=True, blank=True)
    answered_at = models.DateTimeField(null=True, blank=True)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created"]
        verbose_name = "firmware offer"
        indexes = [models.Index(fields=["client_id", "created"]), models.Index(fields=["state", "created"])]

    def __str__(self) -> str:
        return f"{self.release} to {self.client_id}"
