# Fleetkeeper's one image: web (gunicorn), worker, beat, the one-shot migrate, and the broker (Mosquitto from
# Debian, started by `manage.py run_broker`). docker/entrypoint.sh picks the role; docker-compose.yml wires them.

# --- Browser assets come from the npm registry (package-lock.json), never from a CDN.
FROM node:20-bookworm-slim AS assets
WORKDIR /build
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund --loglevel=error

# --- The application.
FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DJANGO_SETTINGS_MODULE=fleet.settings

# Mosquitto 2 (Debian bookworm: 2.0.11, the version docs/broker.md measured); the broker container runs it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends mosquitto \
    && rm -rf /var/lib/apt/lists/*

# An unprivileged user for every role. The broker runs as this user too, so the worker (same uid) may
# signal it; the directories below become the compose volumes and keep this ownership.
RUN useradd --create-home --uid 10001 --user-group fleet \
    && mkdir -p /var/lib/fleetkeeper/var /var/lib/fleetkeeper/mosquitto /var/lib/fleetkeeper/static \
    && chown -R fleet:fleet /var/lib/fleetkeeper

WORKDIR /app
# Dependencies first (from pyproject.toml), so code changes do not reinstall them.
COPY pyproject.toml ./
COPY scripts/pyproject-requirements.py scripts/
RUN python scripts/pyproject-requirements.py > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY . .
COPY --from=assets /build/node_modules/htmx.org/dist/htmx.min.js static/vendor/htmx.min.js
# Static files are collected into the image once (and again into the shared volume when `web` starts).
# collectstatic needs settings, not secrets: it runs in dev mode with a throwaway var dir.
RUN FLEET_ENV=dev FLEET_VAR_DIR=/tmp/build-var STATIC_ROOT=/var/lib/fleetkeeper/static \
        python manage.py collectstatic --noinput --verbosity 0 \
    && rm -rf /tmp/build-var \
    && chown -R fleet:fleet /var/lib/fleetkeeper/static \
    && chmod +x docker/entrypoint.sh

USER fleet
ENV FLEET_ENV=production \
    FLEET_VAR_DIR=/var/lib/fleetkeeper/var \
    MQTT_BROKER_DIR=/var/lib/fleetkeeper/mosquitto \
    STATIC_ROOT=/var/lib/fleetkeeper/static
EXPOSE 8000 18830 18883
ENTRYPOINT ["/app/docker/entrypoint.sh"]
CMD ["web"]
