#!/bin/sh
# The one entrypoint of the Fleetkeeper image; the first argument names the role of the container.
#   migrate  apply database migrations, then exit (docker-compose's one-shot `migrate` service)
#   web      collect static files into the shared volume, then gunicorn on 0.0.0.0:8000
#   worker   the Celery worker (tasks, broker policy applies, the MQTT consumer)
#   beat     Celery beat with the schedules stored in the database (django-celery-beat)
#   broker   Mosquitto, with its config, password and ACL files rendered by the console (manage.py run_broker)
#   hook     the HTTP auth hook RabbitMQ's nodes ask (gunicorn fleet.hook_wsgi on 0.0.0.0:8010; internal network only)
# Anything else is run as given, e.g. `docker compose run --rm web python manage.py bootstrap_admin`.
set -eu

case "${1:-web}" in
    migrate)
        exec python manage.py migrate --noinput
        ;;
    web)
        shift || true
        python manage.py collectstatic --noinput --verbosity 0
        exec gunicorn fleet.wsgi:application \
            --bind 0.0.0.0:8000 \
            --workers "${WEB_CONCURRENCY:-3}" \
            --forwarded-allow-ips "${FORWARDED_ALLOW_IPS:-*}" \
            --access-logfile - \
            "$@"
        ;;
    worker)
        shift || true
        exec celery -A fleet worker --loglevel "${CELERY_LOG_LEVEL:-info}" "$@"
        ;;
    consumer)
        shift || true
        exec python manage.py consume "$@"
        ;;
    beat)
        shift || true
        exec celery -A fleet beat --loglevel "${CELERY_LOG_LEVEL:-info}" --scheduler django "$@"
        ;;
    hook)
        shift || true
        # Threads, and keep-alive connections from the nodes: a connect is two questions (docs/broker.md).
        exec gunicorn fleet.hook_wsgi:application \
            --bind 0.0.0.0:8010 \
            --worker-class gthread \
            --workers "${HOOK_CONCURRENCY:-2}" \
            --threads 8 \
            --keep-alive 30 \
            "$@"
        ;;
    broker)
        shift || true
        exec python manage.py run_broker "$@"
        ;;
    *)
        exec "$@"
        ;;
esac
