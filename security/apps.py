from django.apps import AppConfig
from django.db.models.signals import post_migrate


def _sync_roles(sender, apps=None, **kwargs):
    """Keep the role groups whole after every migrate and every flush (a flush empties auth_group and
    then sends post_migrate): the data migration creates them once, this keeps them there."""
    from django.apps import apps as global_apps

    from .roles import roles_sync

    roles_sync(apps or global_apps)


class SecurityConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "security"
    verbose_name = "Identity and enforcement"

    def ready(self):
        post_migrate.connect(_sync_roles, sender=self, dispatch_uid="security.sync_roles")
