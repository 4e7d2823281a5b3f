"""Inventory API. Thin: every change goes through devices.services with the caller as the actor."""

from dataclasses import dataclass

from django.conf import settings
from django.urls import reverse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_view
from rest_framework import status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound, ParseError, ValidationError
from rest_framework.parsers import BaseParser, MultiPartParser
from rest_framework.response import Response

from devices import selectors, services
from devices.filtersets import DeviceFilterSet
from devices.models import Device, DeviceGroup, DeviceModel, ImportJob
from devices.validators import is_valid_client_id

from .serializers import (
    DeviceGroupSerializer,
    DeviceModelSerializer,
    DeviceSerializer,
    ImportJobSerializer,
    ImportUploadSerializer,
)

CLIENT_ID_PARAMETER = OpenApiParameter(
    "client_id", OpenApiTypes.STR, OpenApiParameter.PATH, description="The device's MQTT client id."
)


@dataclass(frozen=True)
class CsvBody:
    content: bytes


class CsvParser(BaseParser):
    """A raw ``text/csv`` body, for automation that has no multipart client at hand."""

    media_type = "text/csv"

    def parse(self, stream, media_type=None, parser_context=None):
        limit = settings.FLEET_IMPORT_MAX_BYTES
        content = stream.read(limit + 1) if stream is not None else b""
        if len(content) > limit:
            raise ParseError(f"The CSV is larger than the limit of {limit} bytes; split it into smaller files.")
        return CsvBody(content)


def _decode_csv(raw: bytes, field: str) -> str:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValidationError({field: [f"The file is not UTF-8 text (byte {exc.start} is invalid)."]}) from exc
    if "\x00" in text:
        raise ValidationError({field: ["The file contains NUL characters; it is not a text CSV file."]})
    if not text.strip():
        raise ValidationError({field: ["The file is empty; it needs a header row and at least one device."]})
    return text


@extend_schema_view(
    list=extend_schema(summary="List devices", description="Filter, search, sort and page through the fleet."),
    create=extend_schema(summary="Add a device", responses={201: DeviceSerializer}),
    retrieve=extend_schema(summary="One device", parameters=[CLIENT_ID_PARAMETER]),
    update=extend_schema(
        summary="Replace a device's editable fields",
        parameters=[CLIENT_ID_PARAMETER],
        responses={200: DeviceSerializer},
    ),
    partial_update=extend_schema(
        summary="Change some of a device's fields",
        description="Status is not editable here: revoke, quarantine and reinstate are separate actions.",
        parameters=[CLIENT_ID_PARAMETER],
        responses={200: DeviceSerializer},
    ),
    destroy=extend_schema(summary="Delete a device", parameters=[CLIENT_ID_PARAMETER]),
)
class DeviceViewSet(viewsets.ModelViewSet):
    # The class-level queryset names the model for the permission gate and the schema; rows come from
    # the selector, which owns the joins.
    queryset = Device.objects.all()
    serializer_class = DeviceSerializer
    filterset_class = DeviceFilterSet
    lookup_field = "client_id"
    lookup_value_regex = "[^/]+"
    required_permissions = {"import_csv": "devices.import_device"}

    def get_queryset(self):
        return selectors.device_queryset()

    def get_object(self):
        # An id that breaks the fleet rule cannot exist; answering 404 early also keeps odd bytes away
        # from the database.
        if not is_valid_client_id(self.kwargs.get(self.lookup_field, "")):
            raise NotFound("No device has this client id.")
        return super().get_object()

    def perform_create(self, serializer):
        serializer.instance = services.device_create(actor=self.request.user, **serializer.validated_data)

    def perform_update(self, serializer):
        serializer.instance = services.device_update(
            actor=self.request.user, device=serializer.instance, data=dict(serializer.validated_data)
        )

    def perform_destroy(self, instance):
        services.device_delete(actor=self.request.user, device=instance)

    @extend_schema(
        summary="Import devices from CSV",
        description=(
            "Upload a CSV (multipart field `file`, or a raw `text/csv` body). A worker validates every row "
            "first and imports all rows or none; poll the returned job's `url` for progress and for each "
            "rejected row with its line and reason."
        ),
        request={"multipart/form-data": ImportUploadSerializer, "text/csv": OpenApiTypes.BINARY},
        responses={
            202: ImportJobSerializer,
        },
        filters=False,
    )
    @action(
        detail=False,
        methods=["post"],
        url_path="import",
        parser_classes=[MultiPartParser, CsvParser],
        filterset_class=None,
        pagination_class=None,
    )
    def import_csv(self, request):
        if isinstance(request.data, CsvBody):
            filename, content = "upload.csv", _decode_csv(request.data.content, "detail")
        else:
            upload = request.FILES.get("file")
            if upload is None:
                raise ValidationError(
                    {"file": ["Send the CSV as the multipart field 'file', or as a text/csv request body."]}
                )
            limit = settings.FLEET_IMPORT_MAX_BYTES
            if upload.size > limit:
                raise ValidationError(
                    {"file": [f"The file is larger than the limit of {limit} bytes; split it into smaller files."]}
                )
            filename, content = upload.name or "upload.csv", _decode_csv(upload.read(), "file")
        job = services.import_job_create(actor=request.user, filename=filename, content=content)
        data = ImportJobSerializer(job, context=self.get_serializer_context()).data
        return Response(
            data,
            status=status.HTTP_202_ACCEPTED,
            headers={"Location": reverse("api-importjob-detail", kwargs={"pk": job.pk})},
        )


@extend_schema_view(
    list=extend_schema(summary="List CSV import jobs"),
    retrieve=extend_schema(summary="One CSV import job: state, progress and rejected rows"),
)
class ImportJobViewSet(viewsets.ReadOnlyModelViewSet):
    queryset = ImportJob.objects.all()
    serializer_class = ImportJobSerializer
    lookup_value_regex = "[0-9]+"

    def get_queryset(self):
        return selectors.import_job_list(user=self.request.user)


class _CatalogViewSet(viewsets.ModelViewSet):
    """Device models and groups: plain records, saved and deleted through devices.services."""

    lookup_value_regex = "[0-9]+"
    filterset_fields = ["name"]

    def perform_create(self, serializer):
        instance = self.queryset.model(**serializer.validated_data)
        serializer.instance = services.catalog_save(actor=self.request.user, instance=instance)

    def perform_update(self, serializer):
        instance = serializer.instance
        for field, value in serializer.validated_data.items():
            setattr(instance, field, value)
        serializer.instance = services.catalog_save(actor=self.request.user, instance=instance)

    def perform_destroy(self, instance):
        services.catalog_delete(actor=self.request.user, instance=instance)


@extend_schema_view(
    list=extend_schema(summary="List device models"),
    create=extend_schema(summary="Add a device model", responses={201: DeviceModelSerializer}),
    update=extend_schema(responses={200: DeviceModelSerializer}),
    partial_update=extend_schema(responses={200: DeviceModelSerializer}),
    destroy=extend_schema(
        summary="Delete a device model",
        description="Refused with 400 while devices still use the model.",
        responses={204: None},
    ),
)
class DeviceModelViewSet(_CatalogViewSet):
    queryset = DeviceModel.objects.all()
    serializer_class = DeviceModelSerializer

    def get_queryset(self):
        return selectors.devicemodel_list()


@extend_schema_view(
    list=extend_schema(summary="List groups"),
    create=extend_schema(summary="Add a group", responses={201: DeviceGroupSerializer}),
    update=extend_schema(responses={200: DeviceGroupSerializer}),
    partial_update=extend_schema(responses={200: DeviceGroupSerializer}),
    destroy=extend_schema(summary="Delete a group (its devices stay, without the group)"),
)
class DeviceGroupViewSet(_CatalogViewSet):
    queryset = DeviceGroup.objects.all()
    serializer_class = DeviceGroupSerializer

    def get_queryset(self):
        return selectors.devicegroup_list()
