"""The broker hook's WSGI application (security/brokers/hook.py), for a server of its own:

    gunicorn --worker-class gthread --threads 8 --keep-alive 30 --bind 127.0.0.1:8010 fleet.hook_wsgi:application

It serves nothing of the console: no pages, no API, no middleware."""

import os

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "fleet.settings")
django.setup()

from security.brokers.hook import application  # noqa: E402 (after django.setup())

__all__ = ["application"]
