#!/usr/bin/env bash
# The whole suite as `make test` runs it: every test but the soak tests (`make soak`), in two groups.
#
#   1. parallel: everything not marked `serial`, spread over TEST_JOBS pytest-xdist workers. Each worker has its
#      own database, Redis, broker ports and var/ directory (fleet/settings_test.py, tests/conftest.py).
#   2. serial: the tests marked `serial` (wall-clock bounds, fleet-scale loads), alone, one after another.
#
# Then one report for both groups: the counts and the 20 slowest tests.
#
#   scripts/test.sh [pytest arguments...]     e.g. scripts/test.sh tests/security/test_enforcement.py -x
#   TEST_JOBS=1 scripts/test.sh ...           no parallelism (the default is two workers per core: most of the
#                                             suite waits on brokers and workers, not on the CPU)
#   DATABASE_URL=postgres://... scripts/test.sh   the same suite on PostgreSQL (.ci/run does this)
set -uo pipefail
cd "$(dirname "$0")/.."
PYTEST=.venv/bin/pytest
jobs="${TEST_JOBS:-$((2 * $(nproc)))}"
reports="$(mktemp -d /tmp/fleetkeeper-test-report.XXXXXX)"
trap 'rm -rf "$reports"' EXIT

started=$(date +%s)
echo "--- tests, parallel group ($jobs workers) ---"
parallel_rc=0
if [ "$jobs" -gt 1 ]; then
    "$PYTEST" -q -ra -n "$jobs" --dist loadgroup -m "not serial and not soak" --junitxml="$reports/parallel.xml" \
        -o junit_family=xunit1 "$@" || parallel_rc=$?
else
    "$PYTEST" -q -ra -p no:xdist -m "not serial and not soak" --junitxml="$reports/parallel.xml" \
        -o junit_family=xunit1 "$@" || parallel_rc=$?
fi
echo "--- tests, serial group (one at a time) ---"
serial_rc=0
"$PYTEST" -q -ra -p no:xdist -m "serial and not soak" --junitxml="$reports/serial.xml" -o junit_family=xunit1 \
    "$@" || serial_rc=$?

# pytest exits 5 when a group selected nothing (a run of one file, say): fine while the other group ran tests.
.venv/bin/python scripts/test-report.py --slowest 20 --seconds "$(($(date +%s) - started))" \
    --exit-code "$parallel_rc" --exit-code "$serial_rc" \
    "$reports"/*.xml
