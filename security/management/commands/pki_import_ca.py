"""Use an operator's issuing CA (and its chain up to the root) instead of the built-in one."""

from pathlib import Path

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from security.audit import audit_context


class Command(BaseCommand):
    help = (
        "Import an issuing CA certificate, its private key and its chain (up to the self-signed root). The key is "
        "stored encrypted with FLEET_PKI_KEY; the broker gets the new chain, a new server certificate and CRL at "
        "the next policy apply. Certificates issued by the previous CA stay listed and revocable."
    )

    def add_arguments(self, parser):
        parser.add_argument("--cert", required=True, help="PEM file: the issuing CA certificate.")
        parser.add_argument("--key", required=True, help="PEM file: its private key (PKCS#8 or traditional).")
        parser.add_argument("--chain", default="", help="PEM file: the certificates above it, ending with the root.")
        parser.add_argument(
            "--key-password-env",
            default="",
            help="Name of an environment variable holding the key's password, if the key file is encrypted.",
        )

    def handle(self, *args, **options):
        import os

        from security.pki.services import ca_import

        def read(path: str) -> str:
            if not path:
                return ""
            try:
                return Path(path).read_text()
            except OSError as exc:
                raise CommandError(f"Cannot read {path}: {exc}") from exc

        password = os.environ.get(options["key_password_env"], "") if options["key_password_env"] else ""
        try:
            with audit_context(service="pki_import_ca"):
                issuing = ca_import(
                    actor=None,
                    certificate_pem=read(options["cert"]),
                    key_pem=read(options["key"]),
                    chain_pem=read(options["chain"]),
                    key_password=password,
                )
        except ValidationError as exc:
            raise CommandError(" ".join(exc.messages)) from exc
        self.stdout.write(self.style.SUCCESS(f"Imported issuing CA {issuing.subject} (serial {issuing.serial})."))
