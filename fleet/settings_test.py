"""Test settings: the real settings with a throwaway var/ and a fast password hasher for users.

Redis and the broker are real servers started by tests/conftest.py on free ports; their addresses
come in through the environment before this module is read.
"""

import os
import tempfile

from fleet.ports import free_port

# Each test process owns a var/ directory and a Redis port, chosen here before anything reads them; its child
# processes (a Celery worker) inherit them through the environment. Under pytest-xdist every worker process (gw0,
# gw1, ...) inherits the controller's environment too, so a worker that finds values chosen for another process
# (FLEET_TEST_OWNER differs from its own id) chooses its own: nothing is shared between workers by accident.
_owner = os.environ.get("PYTEST_XDIST_WORKER", "main")
if os.environ.get("FLEET_TEST_OWNER") != _owner:
    os.environ["FLEET_TEST_OWNER"] = _owner
    if _owner.startswith("gw") and os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
        # Each worker picks its ports from its own part of the range (fleet/ports.py).
        os.environ["FLEET_PORT_SLICE"] = f"{_owner[2:]}/{os.environ['PYTEST_XDIST_WORKER_COUNT']}"
    os.environ.pop("FLEET_RESERVED_PORTS", None)
    os.environ["FLEET_VAR_DIR"] = tempfile.mkdtemp(prefix=f"fleetkeeper-test-var-{_owner}-")
    os.environ["FLEET_TEST_REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"
os.environ["REDIS_URL"] = os.environ["FLEET_TEST_REDIS_URL"]
for _name in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"):
    os.environ.pop(_name, None)

from .settings import *  # noqa: E402,F403

# Console users' passwords: speed only matters in tests; device secrets use their own hashing.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
REST_FRAMEWORK = {**REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {"token": "1000/min"}}  # noqa: F405

# Tests that run a real Celery worker need the test database to be reachable from another process:
# SQLite's test database is a file (not in-memory), and the worker is told its name.
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":  # noqa: F405
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / "test.sqlite3")}  # noqa: F405
if os.environ.get("FLEET_TEST_DB_NAME"):
    DATABASES["default"]["NAME"] = os.environ["FLEET_TEST_DB_NAME"]  # noqa: F405
