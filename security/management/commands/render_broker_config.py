"""Render the broker's config, password file and ACL into settings.MQTT_BROKER_DIR (atomic writes), without
touching a running broker. `run_broker` does the same and then starts Mosquitto."""

from django.core.management.base import BaseCommand

from security.brokers import get_adapter
from security.services import policy_desired


class Command(BaseCommand):
    help = "Render mosquitto.conf, the password file and the ACL file from the database into MQTT_BROKER_DIR."

    def add_arguments(self, parser):
        parser.add_argument("--print", action="store_true", help="Also print the config and the ACL.")

    def handle(self, *args, **options):
        policy = policy_desired()
        adapter = get_adapter()
        changed = adapter.write(policy)
        paths = adapter.paths if hasattr(adapter, "paths") else {}
        if options["print"]:
            self.stdout.write(policy.config)
            self.stdout.write(policy.acl)
        for name, path in paths.items():
            self.stdout.write(f"{name}: {path}")
        self.stdout.write(
            f"{len(policy.device_usernames)} device(s) on the broker ({len(policy.quarantined)} quarantined), "
            f"{len(policy.console_usernames)} console identities; digest {policy.digest[:16]}; "
            + ("files written." if changed else "files already up to date.")
        )
        if policy.skipped:
            self.stderr.write(
                f"Not rendered (name clashes with a console identity or is unusable): {', '.join(policy.skipped)}"
            )
