#!/usr/bin/env bash
# `make run`: prepare the database, the first user and a demo fleet, then start the whole stack under
# honcho (Procfile). Called by the Makefile after it has installed the system packages, the venv and the
# browser assets. Idempotent: run it as often as you like; Ctrl-C stops everything it started.
#
#   scripts/run.sh             the stack on Mosquitto (make run)
#   scripts/run.sh --cluster   the stack on a local two-node RabbitMQ cluster that asks the console's hook
#                              (make run-cluster; docs/broker.md, "Choosing a broker")
set -euo pipefail
cd "$(dirname "$0")/.."

cluster=0
for arg in "$@"; do
    case "$arg" in
        --cluster) cluster=1 ;;
        -h | --help)
            sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "run.sh: unknown option '$arg' (see --help)" >&2
            exit 2
            ;;
    esac
done
if [ "$cluster" = 1 ]; then
    # Every process of the stack enforces through the cluster: node 0's MQTT listener is MQTT_PORT (node 1's the
    # next port), the management APIs are the two URLs. A value already in the environment (or .env) is kept.
    export BROKER_BACKEND=rabbitmq
    export RABBITMQ_MANAGEMENT_URLS="${RABBITMQ_MANAGEMENT_URLS:-http://127.0.0.1:15672,http://127.0.0.1:15673}"
    # RabbitMQ 3.10 speaks MQTT 3.1.1 only; the hostile devices judge refusals by MQTT 5 reason codes.
    export FLEET_SIMULATE_HOSTILE=0
fi

PY=.venv/bin/python
export DJANGO_SETTINGS_MODULE=fleet.settings
export PYTHONUNBUFFERED=1
WEB_PORT="${FLEET_WEB_PORT:-8000}"
export FLEET_WEB_PORT="$WEB_PORT"

port_in_use() {
    "$PY" - "$1" "$2" <<'PYEOF'
import socket, sys
with socket.socket() as s:
    s.settimeout(0.5)
    sys.exit(0 if s.connect_ex((sys.argv[1], int(sys.argv[2]))) == 0 else 1)
PYEOF
}

if port_in_use 127.0.0.1 "$WEB_PORT"; then
    echo "Something already listens on 127.0.0.1:$WEB_PORT (is \`make run\` already running in another terminal?)." >&2
    echo "Stop it first, or start this one on another port: FLEET_WEB_PORT=8001 make run" >&2
    exit 1
fi

echo "==> Migrating the database"
"$PY" manage.py migrate --noinput -v 0
echo "==> Console user"
admin_output="$("$PY" manage.py bootstrap_admin)"
if grep -qE '^\s*password: ' <<<"$admin_output"; then
    echo "$(head -n 1 <<<"$admin_output") The password is in the banner below."
else
    echo "$admin_output"
fi
echo "==> Demo fleet"
"$PY" manage.py seed_demo

# What the settings say (they read the environment and .env): where Redis is expected, where var/ is.
eval "$("$PY" - <<'PYEOF'
import shlex
from urllib.parse import urlparse

import django

django.setup()
from django.conf import settings

url = urlparse(settings.REDIS_URL)
print(f"REDIS_URL={shlex.quote(settings.REDIS_URL)}")
print(f"REDIS_HOST={shlex.quote(url.hostname or '127.0.0.1')}")
print(f"REDIS_PORT={url.port or 6379}")
print(f"VAR_DIR={shlex.quote(str(settings.VAR_DIR))}")
print(f"MQTT_HOST={shlex.quote(settings.MQTT_HOST)}")
print(f"MQTT_PORT={settings.MQTT_PORT}")
print(f"MQTT_TLS_PORT={settings.MQTT_TLS_PORT}")
print(f"MQTT_BROKER_DIR={shlex.quote(str(settings.MQTT_BROKER_DIR))}")
print(f"BROKER_HOOK_PORT={settings.BROKER_HOOK_PORT}")
PYEOF
)"

processes=(web worker beat)
if "$PY" -c "import redis, sys; redis.Redis.from_url(sys.argv[1], socket_timeout=1).ping()" "$REDIS_URL" 2>/dev/null; then
    redis_note="Redis:    already running at $REDIS_URL (not started by make run)"
elif [ "$REDIS_HOST" = "127.0.0.1" ] || [ "$REDIS_HOST" = "localhost" ]; then
    if port_in_use 127.0.0.1 "$REDIS_PORT"; then
        echo "127.0.0.1:$REDIS_PORT is taken by something that does not answer as Redis ($REDIS_URL)." >&2
        echo "Free the port, or point REDIS_URL at a working Redis (see .env.example)." >&2
        exit 1
    fi
    export FLEET_REDIS_DIR="$VAR_DIR/redis"
    mkdir -p "$FLEET_REDIS_DIR"
    export FLEET_REDIS_PORT="$REDIS_PORT"
    processes=(redis "${processes[@]}")
    redis_note="Redis:    127.0.0.1:$REDIS_PORT (started here, data dir $FLEET_REDIS_DIR)"
else
    echo "No Redis answers at $REDIS_URL, and it is not a local address this script can start Redis on." >&2
    echo "Start that Redis, or unset REDIS_URL to use the local one (127.0.0.1:16379)." >&2
    exit 1
fi

if [ "$cluster" = 1 ]; then
    processes+=(hook cluster)
    broker_note="RabbitMQ: two nodes, MQTT on $MQTT_HOST:$MQTT_PORT and :$((MQTT_PORT + 1)), management $RABBITMQ_MANAGEMENT_URLS;
             every login, publish and subscribe asks the hook on 127.0.0.1:$BROKER_HOOK_PORT; logs in $VAR_DIR/rabbitmq/
             (the nodes take about 40 s to start and join; devices retry until then)"
else
    processes+=(broker)
    broker_note="Mosquitto: $MQTT_HOST:$MQTT_PORT (MQTT), $MQTT_TLS_PORT (TLS, client certificates); files in $MQTT_BROKER_DIR/, log in $VAR_DIR/mosquitto.log"
fi

# The simulated fleet (design.md: on by default in make run). FLEET_SIMULATOR=0 leaves it out.
if [ "${FLEET_SIMULATOR:-1}" != "0" ]; then
    processes+=(simulator)
    simulator_note="Simulator: ${FLEET_SIMULATE_DEVICES:-50} devices (${FLEET_SIMULATE_HOSTILE:-3} hostile) re-issued demo secrets; FLEET_SIMULATOR=0 to leave it out"
    [ "$cluster" = 1 ] && simulator_note="$simulator_note; no hostile devices on RabbitMQ 3.10 (MQTT 3.1.1 only)"
else
    simulator_note="Simulator: off (FLEET_SIMULATOR=0)"
fi

if password_line="$(grep -E '^\s*password: ' <<<"$admin_output")"; then
    login_note="log in as admin with ${password_line#*password: }  (shown only this once: write it down)"
else
    login_note="log in as admin with the password printed by the first \`make run\`
           (forgot it? .venv/bin/python manage.py changepassword admin)"
fi

cat <<BANNER

============================================================================================
 Fleetkeeper is starting.
   Open:   http://127.0.0.1:$WEB_PORT/
   Login:  $login_note
   $redis_note
   $broker_note
   $simulator_note
   Celery: worker and beat (schedules in the database)
 Press Ctrl-C to stop everything.
============================================================================================

BANNER

exec .venv/bin/honcho start -f Procfile -d . "${processes[@]}"
