#!/usr/bin/env bash
# Install the Debian/Ubuntu packages Fleetkeeper needs, only those that are missing.
#
#   scripts/install-system-deps.sh            what `make run` needs: Redis, Mosquitto (+ clients), Node.js/npm
#   scripts/install-system-deps.sh --test     ... plus Debian's Chromium for the Playwright browser tests, and
#                                             RabbitMQ (the HTTP-hook adapter's tests run a real node)
#   scripts/install-system-deps.sh --cluster  ... plus RabbitMQ (make run-cluster starts its own nodes)
#   scripts/install-system-deps.sh --postgres ... plus PostgreSQL (CI runs the suite on it too)
#
# Uses apt-get (with sudo when not root). Never downloads browsers or binaries from anywhere else:
# Playwright drives /usr/bin/chromium from Debian's package.
set -euo pipefail

want_test=0
want_cluster=0
want_postgres=0
for arg in "$@"; do
    case "$arg" in
        --test) want_test=1 want_cluster=1 ;;
        --cluster) want_cluster=1 ;;
        --postgres) want_postgres=1 ;;
        -h | --help)
            sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "install-system-deps: unknown option '$arg' (see --help)" >&2
            exit 2
            ;;
    esac
done

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/bin/$1" ]; }

missing=()
have redis-server || missing+=(redis-server)
have mosquitto || missing+=(mosquitto)
have mosquitto_pub || missing+=(mosquitto-clients)
if ! have node; then
    missing+=(nodejs)
    have npm || missing+=(npm)
elif ! have npm; then
    missing+=(npm)
fi
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
if [ "$want_test" = 1 ]; then
    [ -x /usr/bin/chromium ] || missing+=(chromium)
    # Fonts so that screenshots of pages show text.
    [ -d /usr/share/fonts/truetype/dejavu ] || missing+=(fonts-dejavu-core)
fi
if [ "$want_cluster" = 1 ]; then
    # The tests and `make run-cluster` start their own nodes from the package's scripts; Debian's service is not used.
    compgen -G '/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin/rabbitmq-server' >/dev/null || missing+=(rabbitmq-server)
fi
if [ "$want_postgres" = 1 ]; then
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || missing+=(postgresql)
fi

if [ "${#missing[@]}" -eq 0 ]; then
    echo "System packages: everything needed is installed."
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
else
    echo "install-system-deps: missing packages (${missing[*]}) and this is not root and there is no sudo." >&2
    echo "Install them as root: apt-get update && apt-get install -y ${missing[*]}" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-system-deps: missing packages (${missing[*]}) and apt-get is not available." >&2
    echo "This project installs its system packages on Debian/Ubuntu; install the equivalents by hand." >&2
    exit 1
fi

echo "System packages: installing ${missing[*]} with apt-get ..."
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -q
"${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
echo "System packages: done."
