# The posture audit's reports (security/posture/, docs/posture.md).

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models


def sync_roles(apps, schema_editor):
    """run_posture_audit and view_posturereport exist now: give them to the roles (security/roles.py)."""
    from security.roles import roles_sync

    roles_sync(apps)


class Migration(migrations.Migration):
    dependencies = [
        ("security", "0009_payload_keys"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.CreateModel(
            name="PostureReport",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                (
                    "state",
                    models.CharField(
                        choices=[("queued", "Queued"), ("running", "Running"), ("done", "Done"), ("failed", "Failed")],
                        db_index=True,
                        default="queued",
                        max_length=16,
                    ),
                ),
                (
                    "trigger",
                    models.CharField(
                        choices=[
                            ("schedule", "Schedule"),
                            ("ui", "Run now (page)"),
                            ("api", "API"),
                            ("command", "Command line"),
                        ],
                        default="schedule",
                        max_length=16,
                    ),
                ),
                (
                    "actor_label",
                    models.CharField(blank=True, help_text="Who asked: a username or a service name.", max_length=150),
                ),
                (
                    "target",
                    models.JSONField(blank=True, default=dict, help_text="Host, ports and identities the audit used."),
                ),
                ("created", models.DateTimeField(auto_now_add=True)),
                ("started", models.DateTimeField(blank=True, null=True)),
                ("finished", models.DateTimeField(blank=True, null=True)),
                ("duration_ms", models.FloatField(blank=True, null=True)),
                (
                    "progress",
                    models.JSONField(blank=True, default=dict, help_text="{done, total, current} while it runs."),
                ),
                (
                    "summary",
                    models.JSONField(
                        blank=True, default=dict, help_text="Counts by status and failed counts by severity."
                    ),
                ),
                ("findings", models.JSONField(blank=True, default=list)),
                ("error", models.TextField(blank=True)),
                (
                    "actor",
                    models.ForeignKey(
                        blank=True,
                        null=True,
                        on_delete=django.db.models.deletion.SET_NULL,
                        related_name="+",
                        to=settings.AUTH_USER_MODEL,
                    ),
                ),
            ],
            options={
                "ordering": ["-created", "-id"],
                "permissions": [("run_posture_audit", "Can run the posture audit")],
                "indexes": [models.Index(fields=["state", "created"], name="security_posture_state_idx")],
            },
        ),
        migrations.RunPython(sync_roles, migrations.RunPython.noop),
    ]
