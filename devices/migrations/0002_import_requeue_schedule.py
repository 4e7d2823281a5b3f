"""The schedule that re-sends CSV imports still waiting for a worker (e.g. Redis was down at upload),
as django-celery-beat data an operator can see and change."""

from django.db import migrations

TASK = "devices.requeue_pending_imports"
NAME = "Re-send CSV imports waiting for a worker"


def forwards(apps, schema_editor):
    IntervalSchedule = apps.get_model("django_celery_beat", "IntervalSchedule")
    PeriodicTask = apps.get_model("django_celery_beat", "PeriodicTask")
    schedule, _ = IntervalSchedule.objects.get_or_create(every=60, period="seconds")
    PeriodicTask.objects.get_or_create(
        name=NAME,
        defaults={
            "task": TASK,
            "interval": schedule,
            "description": "Imports whose task could not be queued at upload stay pending; this sends them again.",
            "enabled": True,
        },
    )


def backwards(apps, schema_editor):
    apps.get_model("django_celery_beat", "PeriodicTask").objects.filter(name=NAME).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("devices", "0001_initial"),
        ("django_celery_beat", "0019_alter_periodictasks_options"),
    ]

    operations = [migrations.RunPython(forwards, backwards)]
