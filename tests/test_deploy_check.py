"""Production settings pass Django's deployment checklist; production refuses to start without its
secrets; development generates its secret once under var/ and keeps it private."""

import os
import re
import secrets
import stat
import subprocess
import sys
from pathlib import Path

import pytest

BASE_DIR = Path(__file__).resolve().parents[1]
# Every secret the settings generate in development must come from the environment in production.
PRODUCTION_SECRETS = sorted(
    set(re.findall(r'dev_secret\("([A-Z0-9_]+)"', (BASE_DIR / "fleet" / "settings.py").read_text()))
)

# Only the basics of this process's environment: what the test session set (test settings, a test Redis,
# DJANGO_ALLOW_ASYNC_UNSAFE for the browser tests, ...) must not leak into these runs.
_KEEP = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "USER")


def manage(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k in _KEEP}
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=BASE_DIR,
        env={**base, "DJANGO_SETTINGS_MODULE": "fleet.settings", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def production_env(tmp_path):
    return {
        **{name: secrets.token_urlsafe(50) for name in PRODUCTION_SECRETS},
        "FLEET_ENV": "production",
        "ALLOWED_HOSTS": "fleet.example.test",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        "FLEET_VAR_DIR": str(tmp_path / "var"),
    }


def test_check_deploy_is_clean_with_production_settings(production_env):
    assert "SECRET_KEY" in PRODUCTION_SECRETS
    result = manage("check", "--deploy", "--fail-level", "WARNING", env=production_env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "System check identified no issues" in output
    assert "WARNING" not in output and "security.W" not in output


def test_production_without_secret_key_refuses_to_start(production_env):
    env = {**production_env, "SECRET_KEY": ""}
    result = manage("check", env=env)
    assert result.returncode != 0
    assert "SECRET_KEY must be set in the environment" in result.stderr


def test_production_without_allowed_hosts_is_reported(production_env):
    env = {k: v for k, v in production_env.items() if k != "ALLOWED_HOSTS"}
    result = manage("check", "--deploy", "--fail-level", "WARNING", env=env)
    assert result.returncode != 0
    assert "ALLOWED_HOSTS" in result.stdout + result.stderr


def test_dev_secret_key_is_generated_once_and_private(tmp_path):
    env = {"FLEET_ENV": "dev", "FLEET_VAR_DIR": str(tmp_path / "var")}
    show_key = ["shell", "-c", "from django.conf import settings; print(settings.SECRET_KEY)"]

    def printed_key(result):
        return result.stdout.strip().splitlines()[-1]

    first = manage(*show_key, env=env)
    assert first.returncode == 0, first.stderr
    key_file = tmp_path / "var" / "secrets" / "secret_key"
    assert key_file.exists()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_text().strip()
    assert len(key) >= 50
    assert printed_key(first) == key

    second = manage(*show_key, env=env)
    assert second.returncode == 0, second.stderr
    assert printed_key(second) == key, "the dev SECRET_KEY must survive a restart (sessions stay valid)"

    other = manage(*show_key, env={**env, "FLEET_VAR_DIR": str(tmp_path / "other-var")})
    assert other.returncode == 0, other.stderr
    assert printed_key(other) != key, "each installation gets its own generated key"


def test_env_example_lists_every_variable_the_settings_read():
    settings_text = (BASE_DIR / "fleet" / "settings.py").read_text()
    read = set(re.findall(r'\benv(?:\.\w+)?\(\s*"([A-Z][A-Z0-9_]*)"', settings_text))
    assert {"SECRET_KEY", "DATABASE_URL", "REDIS_URL", "MQTT_HOST"} <= read
    example = (BASE_DIR / ".env.example").read_text()
    listed = set(re.findall(r"^#? ?([A-Z][A-Z0-9_]*)=", example, re.MULTILINE))
    assert read - listed == set(), "add these to .env.example (and docs/configuration.md)"
    assert re.search(r"^FLEET_ENV=production$", example, re.MULTILINE)
    # No real secret in the example: every required secret is left empty.
    for name in PRODUCTION_SECRETS:
        assert re.search(rf"^{name}=$", example, re.MULTILINE), f"{name} must be present and empty in .env.example"


def test_docker_compose_wires_the_stack():
    """Docker cannot run here, so the compose file is checked by reading it."""
    import yaml

    compose = yaml.safe_load((BASE_DIR / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "redis", "mosquitto", "web", "worker", "beat", "migrate"} <= set(services)
    for name, service in services.items():
        if name != "migrate":
            assert "healthcheck" in service, f"{name} has no healthcheck"
    for name in ("web", "worker", "beat", "mosquitto"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert services[name]["environment"]["FLEET_ENV"] == "production"
    assert services["web"]["command"] == ["web"] and services["migrate"]["command"] == ["migrate"]
    # The broker's files and pid file: one volume at MQTT_BROKER_DIR, the worker in the broker's PID namespace.
    broker_dir = services["worker"]["environment"]["MQTT_BROKER_DIR"]
    assert f"broker:{broker_dir}" in services["worker"]["volumes"]
    assert f"broker:{broker_dir}" in services["mosquitto"]["volumes"]
    assert services["worker"]["pid"] == "service:mosquitto"
    entrypoint = (BASE_DIR / "docker" / "entrypoint.sh").read_text()
    for role in ("migrate)", "web)", "worker)", "beat)", "broker)"):
        assert role in entrypoint
