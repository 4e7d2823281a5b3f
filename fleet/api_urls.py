"""/api/v1/: every app's API routes, the token endpoint, the OpenAPI schema and its offline docs."""

import json

from django.contrib.auth.decorators import login_required
from django.http import JsonResponse
from django.urls import Resolver404, include, path, re_path, resolve
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.settings import spectacular_settings
from drf_spectacular.utils import extend_schema
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.permissions import IsAuthenticated

from security.api.views.auth import TokenView


class OfflineSwaggerView(SpectacularSwaggerView):
    """Swagger UI from drf-spectacular-sidecar's local assets. Swagger UI would also send the schema's
    address to validator.swagger.io for its badge whenever the console is not on localhost; turning the
    validator off keeps the page from making any request outside the console."""

    @extend_schema(exclude=True)
    def get(self, request, *args, **kwargs):
        response = super().get(request, *args, **kwargs)
        ui_settings = spectacular_settings.SWAGGER_UI_SETTINGS
        if isinstance(ui_settings, dict):
            response.data["settings"] = json.dumps({**ui_settings, "validatorUrl": None}, indent=2)
        return response


@csrf_exempt  # answers 404 whatever the method; a CSRF refusal first would be an HTML 403
def api_not_found(request, unmatched=""):
    """Any other address under /api/v1/ answers like the API (JSON), not with the console's HTML 404 page."""
    detail = "There is no API endpoint at this address; the endpoints are listed at /api/v1/docs/."
    if not request.path.endswith("/"):
        try:
            resolve(request.path + "/")
        except Resolver404:
            pass
        else:
            detail = f"API addresses end with a slash: {request.path}/"
    return JsonResponse({"detail": detail}, status=404)


# The schema and its docs are for signed-in users: they map the whole console. The docs page is for
# people, so an anonymous visitor is sent to the login page rather than shown a bare 401.

urlpatterns = [
    path("auth/token/", TokenView.as_view(), name="api-token"),
    path("schema/", SpectacularAPIView.as_view(permission_classes=[IsAuthenticated]), name="api-schema"),
    path(
        "docs/",
        login_required(OfflineSwaggerView.as_view(url_name="api-schema", permission_classes=[IsAuthenticated])),
        name="api-docs",
    ),
    path("", include("devices.api.urls")),
    path("", include("security.api.urls")),
    # Keep last.
    re_path(r"^(?P<unmatched>[\s\S]*)\Z", api_not_found, name="api-not-found"),
]
