"""POST /api/v1/auth/token/: trade a username and password for an API token (throttled, audited)."""

from django.contrib.auth import authenticate
from drf_spectacular.utils import OpenApiResponse, extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.authtoken.models import Token
from rest_framework.authtoken.views import ObtainAuthToken
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.throttling import ScopedRateThrottle

from security.audit import audit_record


class TokenRequestSerializer(serializers.Serializer):
    username = serializers.CharField(max_length=150)
    password = serializers.CharField(max_length=4096, trim_whitespace=False, style={"input_type": "password"})

    def validate(self, attrs):
        user = authenticate(request=self.context.get("request"), username=attrs["username"], password=attrs["password"])
        if user is None:  # wrong password, unknown user or a deactivated account: one answer for all
            raise serializers.ValidationError(
                "Unable to log in with the given username and password; check both and try again.",
                code="authorization",
            )
        attrs["user"] = user
        return attrs


def token_issue(*, user) -> Token:
    """The user's API token (created on first use), recorded in the audit log."""
    token, created = Token.objects.get_or_create(user=user)
    audit_record(
        actor=user,
        action="auth.token_issue",
        object_type="user",
        object_id=user.get_username(),
        after={"created": created},
    )
    return token


class TokenView(ObtainAuthToken):
    # Anyone may try to log in; the throttle (scope "token") slows down password guessing. No session
    # authentication here, so the endpoint needs no CSRF token.
    permission_classes = [AllowAny]
    authentication_classes = []
    throttle_classes = [ScopedRateThrottle]
    throttle_scope = "token"
    serializer_class = TokenRequestSerializer

    @extend_schema(
        summary="Obtain an API token",
        description="Send it as `Authorization: Token <key>` on every other call.",
        request=TokenRequestSerializer,
        responses={
            200: inline_serializer("TokenResponse", {"token": serializers.CharField()}),
            400: OpenApiResponse(description="Wrong username or password, or a field is missing."),
            429: OpenApiResponse(description="Too many attempts; wait and try again."),
        },
        auth=[],
    )
    def post(self, request, *args, **kwargs):
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        token = token_issue(user=serializer.validated_data["user"])
        return Response({"token": token.key})
