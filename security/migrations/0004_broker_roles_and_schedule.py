"""Re-sync the roles (security.view_brokerstate and security.sync_policy now exist) and create the broker
reconcile schedule as data an operator can see and change (django-celery-beat)."""

import json

from django.db import migrations

RECONCILE_TASK = "security.reconcile_broker"
RECONCILE_NAME = "Reconcile the broker with the database"


def forwards(apps, schema_editor):
    from django.conf import settings

    from security.roles import roles_sync

    roles_sync(apps)
    IntervalSchedule = apps.get_model("django_celery_beat", "IntervalSchedule")
    PeriodicTask = apps.get_model("django_celery_beat", "PeriodicTask")
    every = max(5, int(getattr(settings, "MQTT_RECONCILE_SECONDS", 60)))
    schedule, _ = IntervalSchedule.objects.get_or_create(every=every, period="seconds")
    PeriodicTask.objects.get_or_create(
        name=RECONCILE_NAME,
        defaults={
            "task": RECONCILE_TASK,
            "interval": schedule,
            "kwargs": json.dumps({"trigger": "schedule"}),
            "description": "Compares the rendered broker files with the database and with what the broker loaded; "
            "rewrites and reloads on drift. Default every 60 s (MQTT_RECONCILE_SECONDS).",
            "enabled": True,
        },
    )


def backwards(apps, schema_editor):
    PeriodicTask = apps.get_model("django_celery_beat", "PeriodicTask")
    PeriodicTask.objects.filter(name=RECONCILE_NAME).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("security", "0003_broker_enforcement"),
        ("django_celery_beat", "0019_alter_periodictasks_options"),
    ]

    operations = [migrations.RunPython(forwards, backwards)]
