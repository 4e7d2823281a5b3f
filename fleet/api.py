"""Shared API plumbing: pagination and one exception handler so every error is a 4xx with a message."""

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import DataError, IntegrityError
from rest_framework import exceptions, status
from rest_framework.pagination import PageNumberPagination
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler


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


# --- OpenAPI: document the error answers every operation can give ---------------------------------------------
# drf-spectacular documents only the success answer; schemathesis (and API clients) rightly expect every
# status the API sends to be documented. The class is built on first use (PEP 562) because this module is
# imported while DRF itself loads (DEFAULT_PAGINATION_CLASS) and drf_spectacular.openapi imports DRF.


def _build_auto_schema():
    from drf_spectacular.openapi import AutoSchema as SpectacularAutoSchema
    from drf_spectacular.types import OpenApiTypes
    from drf_spectacular.utils import OpenApiResponse, inline_serializer
    from rest_framework import serializers

    detail = inline_serializer("ErrorDetail", {"detail": serializers.CharField()})
    responses = {
        "400": OpenApiResponse(
            OpenApiTypes.OBJECT,
            description="Invalid input: each bad field (or query parameter) with a list of messages, "
            "or `detail`/`non_field_errors` for the request as a whole.",
        ),
        "401": OpenApiResponse(detail, description="Not signed in: send `Authorization: Token <key>`."),
        "403": OpenApiResponse(detail, description="Your role does not allow this."),
        "404": OpenApiResponse(detail, description="No such object, or no such page."),
        "409": OpenApiResponse(detail, description="The change conflicts with existing data."),
        "415": OpenApiResponse(detail, description="Unsupported request content type."),
    }

    class AutoSchema(SpectacularAutoSchema):
        def _error_codes(self) -> list[str]:
            codes = ["400"]
            if self.get_auth():
                codes += ["401", "403"]
            if "{" in self.path or self.method == "GET":
                codes.append("404")  # a missing object, or a page past the end of a list
            if self.method in {"POST", "PUT", "PATCH", "DELETE"}:
                codes.append("409")
            if self.method in {"POST", "PUT", "PATCH"}:
                codes.append("415")
            return codes

        def _get_response_bodies(self, direction="response"):
            bodies = super()._get_response_bodies(direction)
            for code in self._error_codes():
                if code not in bodies or not bodies[code].get("content"):
                    bodies[code] = self._get_response_for_code(responses[code], code, direction=direction)
            return bodies

    return AutoSchema


def __getattr__(name: str):
    if name == "AutoSchema":
        globals()["AutoSchema"] = cls = _build_auto_schema()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
