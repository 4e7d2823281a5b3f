"""Browser forms. Thin: they parse and validate input, then hand it to a service that writes and audits."""

from __future__ import annotations

from django import forms
from django.conf import settings
from django.core.exceptions import NON_FIELD_ERRORS, ValidationError
from django.template.defaultfilters import filesizeformat

from . import services
from .models import Device, DeviceGroup, DeviceModel
from .validators import client_id_rule


def add_service_errors(form: forms.Form, error: ValidationError) -> None:
    """Put a service's ValidationError next to the fields it names; anything else goes on top of the form."""
    if hasattr(error, "error_dict"):
        for field, messages in error.message_dict.items():
            target = field if field in form.fields and field != NON_FIELD_ERRORS else None
            for message in messages:
                form.add_error(target, message)
    else:
        for message in error.messages:
            form.add_error(None, message)


class DeviceForm(forms.ModelForm):
    """Create and edit a device. The client id is fixed after creation (it is the broker identity);
    status is changed only by revoke, quarantine and reinstate, which change what the broker enforces."""

    class Meta:
        model = Device
        fields = ["client_id", "name", "model", "groups", "serial", "mac", "firmware_version"]
        widgets = {"groups": forms.CheckboxSelectMultiple}
        error_messages = {"client_id": {"unique": "A device with this client id is already in the inventory."}}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.creating = self.instance.pk is None
        if self.creating:
            self.fields["client_id"].help_text = f"MQTT client id and broker username: {client_id_rule()}."
            self.fields["client_id"].widget.attrs.update(
                {"placeholder": f"{settings.FLEET_CLIENT_ID_PREFIX}…", "autofocus": True, "autocomplete": "off"}
            )
        else:
            del self.fields["client_id"]
        self.fields["model"].empty_label = "— none —"
        self.fields["mac"].help_text = "Optional. Six hex pairs, e.g. 00:1a:2b:3c:4d:5e."

    def save(self, *, actor) -> Device:  # type: ignore[override]
        data = {field: self.cleaned_data[field] for field in services.EDITABLE_DEVICE_FIELDS}
        if self.creating:
            return services.device_create(actor=actor, client_id=self.cleaned_data["client_id"], **data)
        # The form has already copied the new values onto self.instance; the service must see the stored
        # device to record the change it makes.
        stored = Device.objects.select_related("model").get(pk=self.instance.pk)
        return services.device_update(actor=actor, device=stored, data=data)


class DeviceModelForm(forms.ModelForm):
    class Meta:
        model = DeviceModel
        fields = ["name", "manufacturer", "description", "latest_firmware", "minimum_firmware"]
        widgets = {"description": forms.Textarea(attrs={"rows": 3})}

    def save(self, *, actor) -> DeviceModel:  # type: ignore[override]
        return services.catalog_save(actor=actor, instance=self.instance)


class DeviceGroupForm(forms.ModelForm):
    class Meta:
        model = DeviceGroup
        fields = ["name", "description"]
        widgets = {"description": forms.Textarea(attrs={"rows": 3})}

    def save(self, *, actor) -> DeviceGroup:  # type: ignore[override]
        return services.catalog_save(actor=actor, instance=self.instance)


class ImportUploadForm(forms.Form):
    file = forms.FileField(label="CSV file", widget=forms.ClearableFileInput(attrs={"accept": ".csv,text/csv"}))

    def clean_file(self):
        upload = self.cleaned_data["file"]
        limit = settings.FLEET_IMPORT_MAX_BYTES
        if upload.size > limit:
            raise ValidationError(
                f"The file is {filesizeformat(upload.size)}; the limit is {filesizeformat(limit)}. "
                "Split it into smaller files and import them one after another."
            )
        raw = upload.read()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise ValidationError(
                "This file is not UTF-8 text. If it comes from a spreadsheet, "
                "save it as “CSV UTF-8” and upload it again."
            ) from None
        if "\x00" in text:
            raise ValidationError("This file is not a text file. Upload a CSV file saved as UTF-8 text.")
        if not text.strip():
            raise ValidationError("The file is empty. It needs a header line and one line per device.")
        self.cleaned_data["content"] = text
        return upload
