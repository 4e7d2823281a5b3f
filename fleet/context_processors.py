"""What every page needs: the fleet rule, and what the signed-in user may do (for navigation and buttons).

Both are lazy, so a page that does not show them costs no query; the permission checks go through the
one gate, security.permissions.user_can, and reuse the permission cache Django keeps on the user.
"""

from django.conf import settings
from django.utils.functional import SimpleLazyObject

from security.permissions import user_can

# Template name -> permission(s). Buttons and navigation links are shown only when the role allows them;
# the views check again (a hidden button is a courtesy, not the gate).
ABILITIES = {
    "view_device": "devices.view_device",
    "add_device": "devices.add_device",
    "change_device": "devices.change_device",
    "delete_device": "devices.delete_device",
    "import_device": ("devices.import_device", "devices.add_importjob"),
    "view_importjob": "devices.view_importjob",
    "export_device": "devices.export_device",
    "view_devicemodel": "devices.view_devicemodel",
    "add_devicemodel": "devices.add_devicemodel",
    "view_devicegroup": "devices.view_devicegroup",
    "add_devicegroup": "devices.add_devicegroup",
    "view_auditevent": "security.view_auditevent",
    "view_brokerstate": "security.view_brokerstate",
}


def _abilities(user) -> dict[str, bool]:
    return {name: user_can(user, permission) for name, permission in ABILITIES.items()}


def _roles(user) -> str:
    if not getattr(user, "is_authenticated", False):
        return ""
    names = sorted(user.groups.values_list("name", flat=True))
    if user.is_superuser:
        names.insert(0, "superuser")
    return ", ".join(names) or "no role"


def fleet(request):
    user = getattr(request, "user", None)
    return {
        "FLEET_CLIENT_ID_PREFIX": settings.FLEET_CLIENT_ID_PREFIX,
        "can": SimpleLazyObject(lambda: _abilities(user)),
        "user_roles": SimpleLazyObject(lambda: _roles(user)),
        # The first part of the path ("devices", "models", "audit", ...) marks the current item in the navigation.
        "section": request.path.strip("/").split("/", 1)[0],
    }
