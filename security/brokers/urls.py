"""The HTTP auth hook a clustered broker asks (security/brokers/rabbitmq.py). Brokers only: the URL carries
BROKER_HOOK_SECRET, and docker-compose never publishes it."""

from django.urls import path

from . import rabbitmq

urlpatterns = [
    path("broker-hook/rabbitmq/<str:secret>/<str:check>", rabbitmq.auth_hook, name="broker-hook-rabbitmq"),
]
