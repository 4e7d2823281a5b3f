"""OpenAPI: document the error answers every operation can give.

drf-spectacular documents only the success answer; schemathesis (and API clients) rightly expect every
status the API sends to be documented. The default schema class for every API view (settings.REST_FRAMEWORK).
"""

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
