"""Shared API plumbing: pagination and one exception handler so every error is a 4xx with a message."""

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import DataError, IntegrityError, models
from rest_framework import exceptions, serializers, status
from rest_framework.pagination import PageNumberPagination
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler


class StrictCharField(serializers.CharField):
    """DRF's CharField turns 42 into "42"; the schema says string, so a number is a client bug worth a 400."""

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictModelSerializer(serializers.ModelSerializer):
    serializer_field_mapping = {
        **serializers.ModelSerializer.serializer_field_mapping,
        models.CharField: StrictCharField,
        models.TextField: StrictCharField,
    }


class Pagination(PageNumberPagination):
    page_size_query_param = "page_size"
    max_page_size = 1000

    def get_page_size(self, request):
        """DRF silently falls back to the default for a page_size it cannot read; say so instead."""
        raw = request.query_params.get(self.page_size_query_param)
        if raw is None:
            return self.page_size
        try:
            size = int(raw)
        except ValueError:
            size = 0
        if size < 1:
            raise exceptions.ValidationError(
                {self.page_size_query_param: [f"Give a whole number from 1 to {self.max_page_size}."]}
            )
        return min(size, self.max_page_size)


def exception_handler(exc, context):
    if isinstance(exc, DjangoValidationError):
        detail = exc.message_dict if hasattr(exc, "error_dict") else {"detail": exc.messages}
        exc = exceptions.ValidationError(detail)
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied(str(exc) or None)
    elif isinstance(exc, DataError):
        # A value the database cannot store or compare (out of range): the caller's input, not our fault.
        return Response(
            {"detail": "A value in the request is out of the range the database accepts."},
            status=status.HTTP_400_BAD_REQUEST,
        )
    elif isinstance(exc, IntegrityError):
        return Response(
            {"detail": "The change conflicts with existing data (a duplicate or a reference in use)."},
            status=status.HTTP_409_CONFLICT,
        )
    return drf_exception_handler(exc, context)


def __getattr__(name: str):
    # Kept for modules that still import AutoSchema from here; the class lives in fleet.schema (it imports
    # drf-spectacular, which imports DRF, which imports this module for its pagination class).
    if name == "AutoSchema":
        from .schema import AutoSchema

        return AutoSchema
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
