"""Serve the HTTP auth hook that clustered brokers ask (security/brokers/hook.py) on its own listener.

A threaded server for development and `make run-cluster`; production runs gunicorn with fleet.hook_wsgi (keep-alive
connections: docs/broker.md)."""

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from security.brokers.hook import serve


class Command(BaseCommand):
    help = "Serve the broker hook (RabbitMQ's HTTP auth backend, EMQX's HTTP authentication and authorization)."

    def add_arguments(self, parser):
        parser.add_argument("--host", default=settings.BROKER_HOOK_HOST, help="default: BROKER_HOOK_HOST")
        parser.add_argument("--port", type=int, default=settings.BROKER_HOOK_PORT, help="default: BROKER_HOOK_PORT")

    def handle(self, *args, host, port, **options):
        if not settings.BROKER_HOOK_SECRET:
            raise CommandError("BROKER_HOOK_SECRET is not set: the hook would refuse every broker.")
        try:
            server = serve(host, port)
        except OSError as exc:
            raise CommandError(f"cannot listen on {host}:{port}: {exc}") from exc
        self.stdout.write(f"broker hook on http://{host}:{port}/<rabbitmq|emqx>/<BROKER_HOOK_SECRET>/<check>")
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
