from django.apps import AppConfig
from django.db.models.signals import post_migrate


def _sync_roles(sender, apps=None, **kwargs):
    """Keep the role groups whole after every migrate and every flush (a flush empties auth_group and
    then sends post_migrate): the data migration creates them once, this keeps them there."""
    from django.apps import apps as global_apps

    from .roles import roles_sync

    roles_sync(apps or global_apps)


def _rotation_defaults(sender, **kwargs):
    """The fleet's default rotation policy and the rotation tick's schedule exist after every migrate and flush."""
    from django.db import connections

    from .rotation.policies import rotation_defaults_post_migrate

    connection = connections[kwargs.get("using") or "default"]
    tables = connection.introspection.table_names()
    if "security_rotationpolicy" not in tables or "django_celery_beat_periodictask" not in tables:
        return  # migrated only part of the way (migrate security 0007): nothing to schedule yet
    rotation_defaults_post_migrate(sender, **kwargs)


def _posture_schedule(sender, **kwargs):
    from .posture.services import posture_schedule_ensure

    posture_schedule_ensure(sender, **kwargs)


class SecurityConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "security"
    verbose_name = "Identity and enforcement"

    def ready(self):
        post_migrate.connect(_sync_roles, sender=self, dispatch_uid="security.sync_roles")
        post_migrate.connect(_rotation_defaults, sender=self, dispatch_uid="security.rotation_defaults")
        # The posture audit's daily schedule (docs/posture.md).
        post_migrate.connect(_posture_schedule, sender=self, dispatch_uid="security.posture_schedule")
