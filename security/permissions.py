"""One permission gate for the browser UI and the API: roles are Django groups, checks are Django
permissions. A user without the right role gets 403, never a 500 or a silent no-op."""

from django.contrib.auth.mixins import AccessMixin
from django.core.exceptions import PermissionDenied
from rest_framework.permissions import BasePermission


def user_can(user, permission: str | tuple[str, ...] | list[str]) -> bool:
    if not getattr(user, "is_authenticated", False) or not user.is_active:
        return False
    perms = (permission,) if isinstance(permission, str) else tuple(permission)
    return user.has_perms(perms)


def require(user, permission: str) -> None:
    """For services that act on behalf of a user: refuse early with a message that says which right is missing."""
    if not user_can(user, permission):
        raise PermissionDenied(f"Your role does not allow this ({permission}).")


class RoleRequiredMixin(AccessMixin):
    """Class-based views: login first, then the permission; an authenticated user without it gets 403."""

    permission_required: str | tuple[str, ...] = ()

    def get_permission_required(self):
        return self.permission_required

    def dispatch(self, request, *args, **kwargs):
        if not request.user.is_authenticated:
            return self.handle_no_permission()
        required = self.get_permission_required()
        if required and not user_can(request.user, required):
            raise PermissionDenied("Your role does not allow this page.")
        return super().dispatch(request, *args, **kwargs)


_METHOD_ACTIONS = {
    "GET": "view",
    "HEAD": "view",
    "OPTIONS": "view",
    "POST": "add",
    "PUT": "change",
    "PATCH": "change",
    "DELETE": "delete",
}


class RolePermission(BasePermission):
    """API views: ``required_permissions = {"revoke": "devices.revoke_device", ...}`` keyed by the
    viewset action (or HTTP method) decides; otherwise the model's view/add/change/delete permission."""

    message = "Your role does not allow this."

    def has_permission(self, request, view) -> bool:
        user = request.user
        if not getattr(user, "is_authenticated", False):
            return False
        required = getattr(view, "required_permissions", {}) or {}
        action = getattr(view, "action", None)
        if action in required:
            return user_can(user, required[action])
        if request.method in required:
            return user_can(user, required[request.method])
        queryset = getattr(view, "queryset", None)
        if queryset is None:
            # A view with no model and no declared permission is open to every signed-in user only
            # if it says so explicitly.
            return bool(getattr(view, "allow_any_authenticated", False))
        meta = queryset.model._meta
        return user_can(user, f"{meta.app_label}.{_METHOD_ACTIONS.get(request.method, 'change')}_{meta.model_name}")
