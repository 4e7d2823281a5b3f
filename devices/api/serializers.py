"""API representations of the inventory. Thin: they parse and render; devices.services does the work."""

import re

from django.conf import settings
from django.core.validators import RegexValidator
from rest_framework import serializers

from devices.models import Device, DeviceGroup, DeviceModel, ImportJob
from devices.services import CSV_COLUMNS
from devices.validators import client_id_rule, validate_client_id, validate_mac
from fleet.api import StrictModelSerializer

# What devices.validators.normalize_mac accepts: six hex pairs, any of ':', '-', '.', spaces between.
# (Blank is allowed separately: the field has allow_blank.)
MAC_PATTERN = r"^[\s:.\-]*(?:[0-9A-Fa-f][\s:.\-]*){12}$"
MAC_MESSAGE = "%(value)r is not a MAC address; use six hex pairs such as 00:1a:2b:3c:4d:5e."


def client_id_rule_message() -> str:
    return "Client id %(value)r does not match the fleet rule: " + client_id_rule().replace("%", "%%") + "."


class NamedRelatedField(serializers.SlugRelatedField):
    """A model or group referred to by its name, with an error that says where to create a missing one."""

    def __init__(self, *, kind: str, collection: str, **kwargs):
        super().__init__(slug_field="name", **kwargs)
        self.error_messages["does_not_exist"] = (
            f"Unknown {kind} {{value!r}}: create it first (POST /api/v1/{collection}/) or use an existing name."
        )
        self.error_messages["invalid"] = f"Give the {kind} as its name (a string)."

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class DeviceSerializer(StrictModelSerializer):
    url = serializers.HyperlinkedIdentityField(view_name="api-device-detail", lookup_field="client_id")
    model = NamedRelatedField(
        kind="model",
        collection="models",
        queryset=DeviceModel.objects.all(),
        allow_null=True,
        required=False,
        help_text="The device model's name.",
    )
    groups = NamedRelatedField(
        kind="group",
        collection="groups",
        queryset=DeviceGroup.objects.all(),
        many=True,
        required=False,
        help_text="Names of the groups the device belongs to.",
    )

    class Meta:
        model = Device
        fields = [
            "url",
            "client_id",
            "name",
            "model",
            "groups",
            "serial",
            "mac",
            "status",
            "firmware_version",
            "last_seen",
            "created",
            "updated",
        ]
        read_only_fields = ["status", "last_seen", "created", "updated"]
        extra_kwargs = {
            "mac": {"help_text": "Optional MAC address; stored as lower-case aa:bb:cc:dd:ee:ff."},
        }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        client_id = self.fields["client_id"]
        client_id.help_text = (
            "MQTT client id and broker username; set once at creation. "
            f"Rule: '{settings.FLEET_CLIENT_ID_PREFIX}' followed by {settings.FLEET_CLIENT_ID_SUFFIX_PATTERN}."
        )
        # The rules as patterns, so the OpenAPI schema tells clients what an id and a MAC look like. They
        # replace the model's validators here (same rule, one message each); the service's full_clean()
        # still runs the model's, which also refuse MQTT wildcards whatever pattern is configured.
        pattern = f"^{re.escape(settings.FLEET_CLIENT_ID_PREFIX)}(?:{settings.FLEET_CLIENT_ID_SUFFIX_PATTERN})$"
        client_id.validators = [v for v in client_id.validators if v is not validate_client_id] + [
            RegexValidator(pattern, message=client_id_rule_message())
        ]
        mac = self.fields["mac"]
        mac.validators = [v for v in mac.validators if v is not validate_mac] + [
            RegexValidator(MAC_PATTERN, message=MAC_MESSAGE)
        ]

    def validate(self, attrs):
        """Say so when a caller tries to change what this endpoint cannot change, instead of ignoring it."""
        initial = self.initial_data if isinstance(self.initial_data, dict) else {}
        errors = {}
        current_status = self.instance.status if self.instance is not None else Device.Status.ACTIVE
        if "status" in initial and initial["status"] != current_status:
            errors["status"] = [
                "The status cannot be set here: revoke, quarantine and reinstate are separate actions "
                "(POST /api/v1/devices/<client_id>/revoke/, .../quarantine/, .../reinstate/) because each "
                "changes what the broker enforces."
            ]
        if self.instance is not None and "client_id" in attrs and attrs["client_id"] != self.instance.client_id:
            errors["client_id"] = [
                "The client id cannot be changed: it is the device's broker identity. "
                "Create a new device and delete this one instead."
            ]
        if errors:
            raise serializers.ValidationError(errors)
        if self.instance is not None:
            attrs.pop("client_id", None)
        return attrs


class DeviceModelSerializer(StrictModelSerializer):
    url = serializers.HyperlinkedIdentityField(view_name="api-devicemodel-detail")
    device_count = serializers.SerializerMethodField(help_text="Devices of this model.")

    class Meta:
        model = DeviceModel
        fields = [
            "url",
            "id",
            "name",
            "manufacturer",
            "description",
            "latest_firmware",
            "minimum_firmware",
            "device_count",
            "created",
        ]
        read_only_fields = ["created"]

    def get_device_count(self, obj) -> int:
        count = getattr(obj, "device_count", None)
        return count if count is not None else obj.devices.count()


class DeviceGroupSerializer(StrictModelSerializer):
    url = serializers.HyperlinkedIdentityField(view_name="api-devicegroup-detail")
    device_count = serializers.SerializerMethodField(help_text="Devices in this group.")

    class Meta:
        model = DeviceGroup
        fields = ["url", "id", "name", "description", "device_count", "created"]
        read_only_fields = ["created"]

    def get_device_count(self, obj) -> int:
        count = getattr(obj, "device_count", None)
        return count if count is not None else obj.devices.count()


class ImportErrorSerializer(serializers.Serializer):
    line = serializers.IntegerField(allow_null=True, help_text="Line in the file (1 is the header).")
    reason = serializers.CharField()


class ImportJobSerializer(StrictModelSerializer):
    url = serializers.HyperlinkedIdentityField(view_name="api-importjob-detail")
    errors = ImportErrorSerializer(many=True, read_only=True, help_text="Every rejected row with its reason.")
    created_by = serializers.SlugRelatedField(slug_field="username", read_only=True)
    done = serializers.BooleanField(read_only=True)
    percent = serializers.IntegerField(read_only=True)

    class Meta:
        model = ImportJob
        fields = [
            "url",
            "id",
            "filename",
            "state",
            "done",
            "total_rows",
            "processed_rows",
            "imported_rows",
            "percent",
            "errors",
            "created_by",
            "created",
            "finished",
        ]
        read_only_fields = fields


class ImportUploadSerializer(serializers.Serializer):
    """Schema of the multipart form; the view reads the file itself so it can check size and encoding."""

    file = serializers.FileField(
        help_text="CSV with a header row. Columns: " + ", ".join(CSV_COLUMNS) + " (groups separated by ';')."
    )
