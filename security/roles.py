"""The console's roles, as Django groups with permissions (design.md, "API contract": roles).

One table, used by the data migrations that create the groups and by the docs. A permission named
here that does not exist yet (a later feature's) is skipped; the migration that adds it re-runs the sync.
"""

ADMIN, OPERATOR, SUPPORT, AUDITOR = "admin", "operator", "support", "auditor"

_VIEW_INVENTORY = [
    "devices.view_device",
    "devices.view_devicemodel",
    "devices.view_devicegroup",
    # Firmware registry (docs/firmware.md): releases, offers and the public signing key are readable by every role.
    "devices.view_firmwarerelease",
    "devices.view_firmwareoffer",
    "devices.view_firmwaresigningkey",
]

ROLE_PERMISSIONS: dict[str, list[str] | str] = {
    # Everything in the console's own apps and the schedules.
    ADMIN: "__all__",
    # Fleet and credentials.
    OPERATOR: [
        *_VIEW_INVENTORY,
        "devices.add_device",
        "devices.change_device",
        "devices.delete_device",
        "devices.add_devicemodel",
        "devices.change_devicemodel",
        "devices.delete_devicemodel",
        "devices.add_devicegroup",
        "devices.change_devicegroup",
        "devices.delete_devicegroup",
        "devices.import_device",
        "devices.export_device",
        "devices.view_importjob",
        "devices.add_importjob",
        "devices.issue_credentials",
        "devices.rotate_credentials",
        "devices.reinstate_device",
        # Firmware registry: upload (sign), offer, withdraw, mark known-vulnerable. Signing keys: admin only.
        "devices.add_firmwarerelease",
        "devices.offer_firmware",
        "devices.withdraw_firmware",
        "devices.flag_firmware",
        # Credential rotation (issue 7): policies and their schedules, the per-device history.
        "security.view_credentialrotation",
        "security.view_rotationpolicy",
        "security.add_rotationpolicy",
        "security.change_rotationpolicy",
        "security.delete_rotationpolicy",
        "security.view_alert",
        "security.view_brokerstate",
        "security.sync_policy",
        "django_celery_beat.view_periodictask",
        # Posture audit (docs/posture.md): read the reports, run one now.
        "security.view_posturereport",
        "security.run_posture_audit",
    ],
    # On call: stop a compromised device, work the alerts.
    SUPPORT: [
        *_VIEW_INVENTORY,
        "devices.revoke_device",
        "devices.quarantine_device",
        "security.view_alert",
        "security.change_alert",
        "security.view_brokerstate",
        "security.view_credentialrotation",
        "security.view_posturereport",
    ],
    # Read-only, including the audit log.
    AUDITOR: [
        *_VIEW_INVENTORY,
        "devices.export_device",
        "devices.view_importjob",
        "security.view_auditevent",
        "security.view_alert",
        "security.view_brokerstate",
        "security.view_credentialrotation",
        "security.view_rotationpolicy",
        "django_celery_beat.view_periodictask",
        "security.view_posturereport",
    ],
}
ADMIN_APPS = ["devices", "security", "django_celery_beat", "authtoken"]


def roles_sync(apps) -> None:
    """Create or update the role groups. Works with historical models (``apps`` from a migration)."""
    from django.contrib.auth.management import create_permissions

    # Permissions are normally created after all migrations (post_migrate); create them now so the groups
    # can be given them. Historical app configs have no models_module, which create_permissions requires.
    for app_config in apps.get_app_configs():
        original = getattr(app_config, "models_module", None)
        app_config.models_module = original or True
        try:
            create_permissions(app_config, verbosity=0, apps=apps)
        finally:
            app_config.models_module = original

    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    for role, spec in ROLE_PERMISSIONS.items():
        group, _ = Group.objects.get_or_create(name=role)
        if spec == "__all__":
            # Everything except changing or deleting audit events: the log is append-only for everyone.
            perms = Permission.objects.filter(content_type__app_label__in=ADMIN_APPS).exclude(
                codename__in=["change_auditevent", "delete_auditevent", "add_auditevent"]
            )
        else:
            wanted = [name.split(".", 1) for name in spec]
            perms = [
                p
                for p in Permission.objects.filter(codename__in=[c for _, c in wanted]).select_related("content_type")
                if [p.content_type.app_label, p.codename] in wanted
            ]
        group.permissions.set(perms)
