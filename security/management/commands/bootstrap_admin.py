"""Create the first console user: `admin`, a superuser in the admin role, with a generated password.

The password is printed once and only its hash is stored. Running the command again changes
nothing and says how to reset the password, so `make run` can call it on every start.
"""

import secrets

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from security.audit import audit_context, audit_record
from security.roles import ADMIN


class Command(BaseCommand):
    help = (
        "Create the console's first user (default 'admin'): a superuser in the 'admin' role with a "
        "generated password that is printed once and never stored in plaintext. If the user already "
        "exists nothing changes; reset its password with `manage.py changepassword <username>`."
    )

    def add_arguments(self, parser):
        parser.add_argument("--username", default="admin", help="Name of the user to create (default: admin).")
        parser.add_argument("--email", default="", help="Optional e-mail address for the user.")

    def handle(self, *args, username: str, email: str, **options):
        User = get_user_model()
        try:
            role = Group.objects.get(name=ADMIN)
        except Group.DoesNotExist as exc:
            raise CommandError(f"The {ADMIN!r} role does not exist yet: run `manage.py migrate` first.") from exc

        if User.objects.filter(username=username).exists():
            self.stdout.write(
                f"User {username!r} already exists; its password is unchanged. "
                f"To set a new one: .venv/bin/python manage.py changepassword {username}"
            )
            return

        password = secrets.token_urlsafe(18)
        with audit_context(service="bootstrap_admin"), transaction.atomic():
            user = User.objects.create_superuser(username=username, email=email, password=password)
            user.groups.add(role)
            audit_record(
                actor=None,
                action="user.create",
                target=user,
                object_id=username,
                after={"username": username, "is_superuser": True, "groups": [ADMIN]},
            )
        self.stdout.write(self.style.SUCCESS(f"Created user {username!r} with the {ADMIN!r} role."))
        self.stdout.write(f"  username: {username}")
        self.stdout.write(f"  password: {password}")
        self.stdout.write("This password is shown only now and is not stored anywhere in plaintext: write it down.")
