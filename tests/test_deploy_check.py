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
        if name not in ("migrate", "rabbitmq-config"):
            assert "healthcheck" in service, f"{name} has no healthcheck"
    # One broker per stack: `--profile mosquitto` or `--profile rabbitmq`; a service of one never waits for the other's.
    profile = {name: service.get("profiles", []) for name, service in services.items()}
    assert {p for profiles in profile.values() for p in profiles} == {"mosquitto", "rabbitmq"}
    assert all(len(profiles) <= 1 for profiles in profile.values())
    for name, service in services.items():
        for needed in service.get("depends_on", {}):
            assert profile[needed] in ([], profile[name]), f"{name} ({profile[name]}) waits for {needed}"
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


def _env_example_block(title: str) -> dict[str, str]:
    """The commented-out NAME=value lines of .env.example's block that starts with ``title``."""
    lines = (BASE_DIR / ".env.example").read_text().splitlines()
    start = next(n for n, line in enumerate(lines) if line.startswith(f"# {title}"))
    block = {}
    for line in lines[start + 1 :]:
        match = re.fullmatch(r"# ([A-Z0-9_]+)=(.*)", line)
        if not line.startswith("#") or (block and not match):
            break
        if match:
            block[match[1]] = match[2]
    return block


def test_docker_compose_rabbitmq_profile_renders_a_cluster_the_console_reaches_and_publishes_no_console_port(
    production_env, tmp_path
):
    """By reading, as above; the config one-shot's own command runs here, with docker/.env as .env.example's
    "--profile rabbitmq" block says, and renders a config for the very nodes, hook and cache the compose file names."""
    import yaml

    services = yaml.safe_load((BASE_DIR / "docker-compose.yml").read_text())["services"]
    nodes = {name: s for name, s in services.items() if re.fullmatch(r"rabbitmq-\d", name)}
    assert len(nodes) == 3 and all(s["hostname"] == name for name, s in nodes.items())
    config = services["rabbitmq-config"]
    args = dict(arg.removeprefix("--").split("=", 1) for arg in config["command"][3:] if "=" in arg)
    cluster = [arg.split("=", 1)[1] for arg in config["command"] if arg.startswith("--cluster-node=")]
    assert cluster == [f"rabbit@{name}" for name in nodes]
    assert f"rabbitmq-config:{args['out']}" in config["volumes"]
    for name, node in nodes.items():
        assert f"rabbitmq-config:{args['out']}:ro" in node["volumes"]
        assert node["environment"]["RABBITMQ_CONFIG_FILE"] == f"{args['out']}/rabbitmq.conf"
        assert f"{args['out']}/erlang.cookie" in node["entrypoint"][-1]
        # Plain MQTT on this host only; the management API never published.
        assert all(str(port).startswith("127.0.0.1:") and not str(port).endswith(":15672") for port in node["ports"])
    assert nodes["rabbitmq-2"]["depends_on"] == {"rabbitmq-1": {"condition": "service_healthy"}}
    hook = services[args["hook-host"]]
    assert hook["command"] == ["hook"] and "ports" not in hook and hook["expose"] == ["8010"]
    assert "hook)" in (BASE_DIR / "docker" / "entrypoint.sh").read_text()

    env = _env_example_block("docker-compose --profile rabbitmq")
    assert set(env) == {"BROKER_BACKEND", "RABBITMQ_MANAGEMENT_URLS", "ENFORCEMENT_CACHE_URL"}
    cache_host = re.match(r"redis://([^:/]+)", env["ENFORCEMENT_CACHE_URL"])[1]
    assert "--appendonly" in services[cache_host]["command"] and "yes" not in services[cache_host]["command"]
    env |= {"MQTT_HOST": "rabbitmq-1", "MQTT_PORT": "1883"}
    out = tmp_path / "rabbitmq"
    assert config["command"][:3] == ["python", "manage.py", "render_rabbitmq_config"]
    command = [arg for arg in config["command"][2:] if not arg.startswith(("--out=", "--owner="))]
    done = manage(*command, f"--out={out}", env={**production_env, **env})
    assert done.returncode == 0, done.stderr
    conf = (out / "rabbitmq.conf").read_text()
    assert f"auth_http.user_path = http://hook:8010/rabbitmq/{production_env['BROKER_HOOK_SECRET']}/user" in conf
    assert "cluster_formation.classic_config.nodes.3 = rabbit@rabbitmq-3" in conf
    assert {path.name for path in out.iterdir()} == {
        "rabbitmq.conf",
        "enabled_plugins",
        "definitions.json",
        "erlang.cookie",
    }

    # A docker/.env left as it was for the Mosquitto stack: the one-shot refuses, so no node starts.
    refused = manage(*command, f"--out={tmp_path / 'refused'}", env=production_env)
    assert refused.returncode != 0 and "BROKER_BACKEND is 'mosquitto'" in refused.stderr
