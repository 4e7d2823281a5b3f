"""manage.py posture_audit: run the posture audit now, in this process, and print (or --json) the findings.

Without --host/--port it audits the console's own broker with the console's identities (docs/posture.md); with them
it audits another broker as an outsider (anonymous, a few default credentials), plus a device identity when
--username/--password are given. Every run is recorded as a report (trigger "command")."""

import json
import sys

from django.core.management.base import BaseCommand, CommandError

from security.audit import audit_context
from security.posture import services as posture

EXIT_FAILED_CRITICAL = 2


class Command(BaseCommand):
    help = (
        "Probe an MQTT broker the way an attacker would and report what is weak (docs/posture.md). Defaults to the "
        "console's own broker. Exit status 2 when a critical check failed."
    )

    def add_arguments(self, parser):
        parser.add_argument("--host", help="Another broker's host (default: the console's broker, MQTT_HOST).")
        parser.add_argument("--port", type=int, help="Its plain MQTT port (default: MQTT_PORT with the console's).")
        parser.add_argument("--tls-port", type=int, help="Its TLS port, if any (default: MQTT_TLS_PORT).")
        parser.add_argument("--ca-file", help="A CA bundle to verify its server certificate against.")
        parser.add_argument("--username", help="A device identity to run the device checks with (another broker).")
        parser.add_argument("--password", help="That identity's password.")
        parser.add_argument(
            "--expect-client-certificates",
            action="store_true",
            help="The fleet uses client certificates: a TLS listener that does not require one fails.",
        )
        parser.add_argument("--json", action="store_true", help="Print the report as JSON.")

    def handle(self, *args, **options):
        external = any(options.get(k) for k in ("host", "port", "tls_port"))
        if external:
            if not options.get("host") or not (options.get("port") or options.get("tls_port")):
                raise CommandError("Give --host and at least one of --port or --tls-port to audit another broker.")
            target = posture.posture_target_external(
                host=options["host"],
                port=options.get("port"),
                tls_port=options.get("tls_port"),
                ca_file=options.get("ca_file"),
                username=options.get("username"),
                password=options.get("password"),
                certificates_expected=options["expect_client_certificates"],
            )
        else:
            target = posture.posture_target_managed()
        with audit_context(service="posture-audit-command"):
            report = posture.posture_run_now(target=target, actor_label="command:posture_audit")
        if options["json"]:
            self.stdout.write(
                json.dumps(
                    {
                        "id": report.pk,
                        "state": report.state,
                        "target": report.target,
                        "duration_ms": report.duration_ms,
                        "summary": report.summary,
                        "findings": report.findings,
                        "error": report.error,
                    },
                    indent=2,
                    default=str,
                )
            )
        else:
            self._print(report)
        if report.summary.get("failed_by_severity", {}).get("critical"):
            sys.exit(EXIT_FAILED_CRITICAL)

    def _print(self, report):
        target = report.target
        self.stdout.write(
            f"Posture audit #{report.pk} of {target.get('host')}:{target.get('port')}"
            f"{' TLS ' + str(target['tls_port']) if target.get('tls_port') else ''}: {report.state}, "
            f"{report.duration_ms or 0:.0f} ms"
        )
        if report.error:
            self.stderr.write(f"The audit could not run: {report.error}")
        for finding in report.findings:
            line = f"  {finding['status'].upper():8} {finding['severity']:8} {finding['id']:26} {finding['title']}"
            style = {"fail": self.style.ERROR, "pass": self.style.SUCCESS}.get(finding["status"], self.style.WARNING)
            self.stdout.write(style(line))
            if finding["status"] != "pass":
                if finding["evidence"].get("why"):
                    self.stdout.write(f"{'':37}why: {finding['evidence']['why']}")
                self.stdout.write(f"{'':37}fix: {finding['fix']}")
        summary = report.summary
        self.stdout.write(
            f"{summary.get('fail', 0)} failed, {summary.get('unknown', 0)} unknown, {summary.get('pass', 0)} passed."
        )
