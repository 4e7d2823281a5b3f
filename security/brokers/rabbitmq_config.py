"""The RabbitMQ node configuration the console's enforcement needs, as text (no Django import): the local nodes of
the tests, the benchmark and `make run-cluster` (rabbitmq_local.py) and docker-compose's cluster
(`manage.py render_rabbitmq_config`) are configured by this one function.

Every login, vhost, resource and topic question goes to the hook; only the console's management user lives in the
node's internal store, and it has no permission on any resource (it cannot use MQTT). MQTT is plain 3.1.1 with no
anonymous login; a message over ``max_message_size`` is dropped."""

from __future__ import annotations

import base64
import hashlib
import json
import os

PLUGINS = ("rabbitmq_mqtt", "rabbitmq_auth_backend_http", "rabbitmq_management")
CHECKS = ("user", "vhost", "resource", "topic")


def enabled_plugins() -> str:
    return f"[{','.join(PLUGINS)}].\n"


def render_conf(
    *,
    hook_url: str,
    amqp_listener: str,
    mqtt_listener: str,
    management_port: int,
    management_ip: str | None = None,
    vhost: str = "/",
    max_message_size: int = 65536,
    log_to_console: bool = False,
    cluster_nodes: list[str] | None = None,
    definitions_file: str | None = None,
) -> str:
    """``hook_url``: the hook up to the check name, e.g. http://hook:8010/rabbitmq/<BROKER_HOOK_SECRET>. Listeners
    are ``port`` (every interface) or ``address:port``. ``cluster_nodes`` (e.g. ``rabbit@rabbitmq-1``): the nodes
    that form one cluster by themselves at first boot. ``definitions_file``: where the node finds ``definitions()``
    (the console's management user, made at boot; the local nodes add theirs with rabbitmqctl instead)."""
    hook_url = hook_url.rstrip("/")
    lines = [f"listeners.tcp.default = {amqp_listener}"]
    if management_ip:
        lines.append(f"management.tcp.ip = {management_ip}")
    lines += [
        f"management.tcp.port = {management_port}",
        f"mqtt.listeners.tcp.default = {mqtt_listener}",
        "mqtt.allow_anonymous = false",
        f"mqtt.vhost = {vhost}",
        "# The console's management user lives in the internal store (no resource permission: it cannot use MQTT);",
        "# every other login is the hook's to decide. No auth cache in front of it: a revoked secret would live on.",
        "auth_backends.1 = internal",
        "auth_backends.2 = http",
        "auth_http.http_method = post",
        *(f"auth_http.{check}_path = {hook_url}/{check}" for check in CHECKS),
        "loopback_users = none",
        f"max_message_size = {max_message_size}",
        f"log.console = {'true' if log_to_console else 'false'}",
        "log.file.level = info",
    ]
    if definitions_file:
        lines.append(f"load_definitions = {definitions_file}")
    if cluster_nodes:
        lines.append("cluster_formation.peer_discovery_backend = classic_config")
        lines += [f"cluster_formation.classic_config.nodes.{n} = {node}" for n, node in enumerate(cluster_nodes, 1)]
    return "\n".join(lines) + "\n"


def password_hash(password: str, *, salt: bytes | None = None) -> str:
    """RabbitMQ's stored form of a password (rabbit_password_hashing_sha256): base64(salt + SHA-256(salt + password)),
    with a 4-byte random salt."""
    salt = os.urandom(4) if salt is None else salt
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def definitions(*, management_user: str, management_password: str, vhost: str = "/") -> str:
    """What a node imports at boot: the vhost and the console's management user with the administrator tag and no
    permission on any vhost, so its password opens the management API and nothing over MQTT or AMQP. Importing
    definitions also keeps the node from creating its default ``guest`` user."""
    return json.dumps(
        {
            "users": [
                {
                    "name": management_user,
                    "password_hash": password_hash(management_password),
                    "hashing_algorithm": "rabbit_password_hashing_sha256",
                    "tags": ["administrator"],
                }
            ],
            "vhosts": [{"name": vhost}],
            "permissions": [],
        },
        indent=2,
    )
