"""RabbitMQ (a cluster of nodes with rabbitmq_mqtt, rabbitmq_auth_backend_http and rabbitmq_management): the broker
asks the console at every connect, subscribe and publish through the HTTP auth backend, and the console answers
from the enforcement core; live sessions are dropped through the management API of any node.

Measured facts behind it are in ../shared/rabbitmq-notes.md: the backend posts form fields (``user_path``:
username, password, vhost, client_id; ``vhost_path``: username, vhost, ip, client_id; ``resource_path``:
resource, name, permission, client_id; ``topic_path``: permission read|write and the routing key, MQTT's ``/``
written ``.`` and ``+`` written ``*``) and reads the body ``allow`` or ``deny``. A denied publish or subscribe
closes the client's connection (MQTT 3.1.1 has no per-message refusal). A deny does not end a session that is
already open, and a live connection keeps the topic rights it was granted: every change of rights ends the
session through the management API (``disconnect``).

The HTTP side (the broker's secret, body limits, rate limit, events) is security/brokers/hook.py; this module is
the dialect: the form fields in, the core's decision, ``allow`` or ``deny`` out.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import time
import urllib.error
import urllib.parse
import urllib.request

from django.conf import settings

from security.enforcement import cache, decisions
from security.enforcement.login import login_decision
from security.enforcement.state import identity_desired

from . import rabbitmq_config
from .base import ApplyResult, BrokerUnavailable
from .hook_adapter import HookBrokerAdapter

log = logging.getLogger(__name__)

CHECKS = rabbitmq_config.CHECKS
EXCHANGE = "amq.topic"  # where rabbitmq_mqtt publishes and binds
# rabbitmq_mqtt's queue for a client's subscriptions, per QoS: mqtt-subscription-<client id>qos0 / qos1.
SUBSCRIPTION_QUEUE_PREFIX = "mqtt-subscription-"
CAPABILITIES = {
    "name": "rabbitmq",
    "refusal": "a refused login gets CONNACK 'bad user name or password'; a denied publish or subscribe closes the "
    "connection (MQTT 3.1.1)",
    "kick": True,  # the management API drops a session on any node
    "mqtt5": False,  # RabbitMQ 3.10; MQTT 5 comes with 3.13
    "shared_subscriptions": False,  # no $share/ before 3.13: one consumer replica reads the fleet's telemetry
    "events": "hook",  # refusals are the hook's events (security/enforcement/events.py)
    "tls_client_certificates": False,  # not wired by the console yet
    "oversize_disconnects": True,  # a publish over max_message_size ends the connection (measured, 3.10.8)
    "rights_change_needs_reconnect": True,  # topic decisions are cached per connection
    "denial_disconnects": True,  # a denied publish or subscribe closes the connection
    "filters_each_delivery": False,  # a subscription is checked once, when it is made
    "foreign_client_id": "refused",  # the hook refuses a client id other than the username
}


def answer_bytes(decision: decisions.Decision) -> tuple[str, str, bytes]:
    """The HTTP answer RabbitMQ's backend reads: the body ``allow`` or ``deny`` (a request without the broker's
    secret gets a 403, which RabbitMQ also reads as a refusal)."""
    if decision.reason == "broker_secret":
        return "403 Forbidden", "text/plain", b"deny"
    return "200 OK", "text/plain", b"allow" if decision.allow else b"deny"


def routing_key_to_topic(routing_key: str) -> str:
    """rabbitmq_mqtt writes an MQTT topic as an AMQP routing key: ``/`` becomes ``.``, ``+`` becomes ``*``
    (``#`` stays). Client ids and the topic prefixes contain no ``.``, so the way back is exact for the fleet's
    topics; anything else simply matches no grant."""
    return routing_key.replace(".", "/").replace("*", "+")


def decide(check: str, body: bytes, *, content_type: str = "") -> tuple[decisions.Decision, dict]:
    """One question of RabbitMQ's HTTP backend (a form-encoded body) answered by the core, and what the event about
    a refusal says (username, client id, source address, topic, permission)."""
    try:
        pairs = urllib.parse.parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body))
    except (UnicodeDecodeError, ValueError):
        return decisions.Decision(False, "malformed"), {}
    fields = dict(pairs)
    if len(fields) != len(pairs):
        return decisions.Decision(False, "malformed"), {}  # a field twice: which one would the broker mean?
    said = {
        "username": fields.get("username", ""),
        "client_id": fields.get("client_id", "") or fields.get("variable_map.client_id", ""),
        "ip": fields.get("ip", ""),
        "topic": routing_key_to_topic(fields.get("routing_key", "")) if check == "topic" else fields.get("name", ""),
        "permission": fields.get("permission", ""),
    }
    if check not in CHECKS:
        return decisions.Decision(False, "malformed"), said
    return _decide(check, fields, said), said


def _decide(check: str, fields: dict, said: dict) -> decisions.Decision:
    username, client_id = said["username"], said["client_id"]
    if not username:
        return decisions.Decision(False, "malformed")
    if check == "user":
        if not client_id:
            # Only MQTT logins carry a client id: a device secret presented on AMQP or to the management UI is refused.
            return decisions.Decision(False, "not_mqtt")
        return login_decision(username, password=fields.get("password", ""), client_id=client_id)
    identity = cache.identity(username)
    session = decisions.session_decision(identity, client_id=client_id)
    if not session:
        return session
    if check == "vhost":
        return decisions.ALLOW if fields.get("vhost") == settings.RABBITMQ_VHOST else decisions.Decision(False, "vhost")
    if check == "resource":
        return _resource_decision(identity.client_id, fields)
    # check == "topic"
    if (
        fields.get("resource") != "topic"
        or fields.get("name") != EXCHANGE
        or fields.get("vhost") != settings.RABBITMQ_VHOST
    ):
        return decisions.Decision(False, "malformed")
    permission = fields.get("permission")
    if permission == "write":
        return decisions.publish_decision(identity, client_id=client_id, topic=said["topic"])
    if permission == "read":
        return decisions.subscribe_decision(identity, client_id=client_id, topic_filter=said["topic"])
    return decisions.Decision(False, "malformed")


def _resource_decision(client_id: str, fields: dict) -> decisions.Decision:
    """What rabbitmq_mqtt needs for a client: read and write on the topic exchange (the topic checks decide what),
    and its own subscription queues. No configure on the exchange, no other queue, no other vhost."""
    if fields.get("vhost") != settings.RABBITMQ_VHOST:
        return decisions.Decision(False, "vhost")
    resource, name, permission = fields.get("resource"), fields.get("name", ""), fields.get("permission")
    if resource == "exchange" and name == EXCHANGE and permission in ("read", "write"):
        return decisions.ALLOW
    own_queues = {f"{SUBSCRIPTION_QUEUE_PREFIX}{client_id}qos0", f"{SUBSCRIPTION_QUEUE_PREFIX}{client_id}qos1"}
    if resource == "queue" and name in own_queues and permission in ("configure", "read", "write"):
        return decisions.ALLOW
    return decisions.Decision(False, "resource_denied")


# --- the management API ----------------------------------------------------------------------------------------


class ManagementUnavailable(Exception):
    """No node's management API answered."""


def _management_request(method: str, path: str, *, body: list | None = None) -> int:
    """Send to the first node that answers; the status code (a GET's JSON answer is appended to ``body``). Raises
    ManagementUnavailable when none does."""
    token = base64.b64encode(
        f"{settings.RABBITMQ_MANAGEMENT_USER}:{settings.RABBITMQ_MANAGEMENT_PASSWORD}".encode()
    ).decode()
    errors = []
    for base in settings.RABBITMQ_MANAGEMENT_URLS:
        if urllib.parse.urlsplit(base).scheme not in ("http", "https"):
            errors.append(f"{base}: not an http(s) URL")
            continue
        request = urllib.request.Request(  # noqa: S310 (http or https only: checked above)
            base.rstrip("/") + path,
            method=method,
            headers={"Authorization": f"Basic {token}", "X-Reason": "fleetkeeper: access changed"},
        )
        try:
            with urllib.request.urlopen(request, timeout=settings.RABBITMQ_MANAGEMENT_TIMEOUT) as response:  # noqa: S310
                if body is not None:
                    body.append(json.loads(response.read() or b"null"))
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError as exc:
            errors.append(f"{base}: {exc}")
    raise ManagementUnavailable("; ".join(errors) or "no management URL configured")


def disconnect(usernames: list[str]) -> dict[str, str]:
    """Drop every live connection of each username, wherever in the cluster it is connected: "dropped", or
    "not connected" (404). Raises ManagementUnavailable when no node answers (the change stays pending)."""
    outcome = {}
    for username in usernames:
        status = _management_request("DELETE", f"/api/connections/username/{urllib.parse.quote(username, safe='')}")
        if status in (200, 204):
            outcome[username] = "dropped"
        elif status == 404:
            outcome[username] = "not connected"
        else:
            raise ManagementUnavailable(f"the management API answered {status} for {username}")
    return outcome


def live_connections(username: str) -> int:
    """How many connections ``username`` has open anywhere in the cluster."""
    answer: list = []
    status = _management_request(
        "GET", f"/api/connections/username/{urllib.parse.quote(username, safe='')}", body=answer
    )
    if status == 404:
        return 0
    if status != 200:
        raise ManagementUnavailable(f"the management API answered {status} listing {username}'s connections")
    return len(answer[0] or [])


def purge(usernames: list[str]) -> dict[str, str]:
    """Delete the subscription queues (queued QoS 1 messages) of these identities: "deleted" or "none"."""
    outcome = {}
    vhost = urllib.parse.quote(settings.RABBITMQ_VHOST, safe="")
    for username in usernames:
        deleted = False
        for qos in (0, 1):
            queue = urllib.parse.quote(f"{SUBSCRIPTION_QUEUE_PREFIX}{username}qos{qos}", safe="")
            status = _management_request("DELETE", f"/api/queues/{vhost}/{queue}")
            if status in (200, 204):
                deleted = True
            elif status != 404:
                raise ManagementUnavailable(f"the management API answered {status} deleting {username}'s queue")
        outcome[username] = "deleted" if deleted else "none"
    return outcome


# --- the adapter -------------------------------------------------------------------------------------------------


class RabbitMQCluster(HookBrokerAdapter):
    """BROKER_BACKEND=rabbitmq. The hook decides every new question from the desired state, so applying a change is
    ending the live sessions whose rights changed; the canary proves the cluster asks the hook."""

    name = "rabbitmq"

    capability_table = CAPABILITIES

    def disconnect(self, usernames: list[str]) -> dict[str, str]:
        try:
            return disconnect(usernames)
        except ManagementUnavailable as exc:
            raise BrokerUnavailable(f"No RabbitMQ management API answered: {exc}") from exc

    def purge(self, usernames: list[str]) -> dict[str, str]:
        try:
            return purge(usernames)
        except ManagementUnavailable as exc:
            raise BrokerUnavailable(f"No RabbitMQ management API answered: {exc}") from exc

    def apply(self, client_ids: list[str]) -> ApplyResult:
        started = time.monotonic()
        names = sorted({c for c in client_ids if c})
        dropped = self.disconnect(names) if names else {}
        kicked_ms = round((time.monotonic() - started) * 1000, 1)
        probe = self.probe()
        return ApplyResult(
            digest="",
            written=False,
            reloaded=False,
            process=None,
            probe=probe,
            timings={"kick_ms": kicked_ms, "sessions": dropped},
        )

    def verify_action(self, *, action: str, client_id: str) -> tuple[bool, dict]:
        identity = identity_desired(client_id)
        evidence: dict = {
            "broker": f"rabbitmq {self.host}:{self.port}",
            "checked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        live = live_connections_or_unknown(client_id)
        evidence["live_connections"] = live
        if action == "revoke":
            code = self.connect_code(client_id, secrets.token_urlsafe(24))
            evidence["connect_attempt"] = {"username": client_id, "password": "random, never issued", "code": code}
            evidence["desired"] = "may not connect"
            ok = code != 0 and (identity is None or not identity.may_connect) and live == 0
        elif action == "quarantine":
            evidence["desired"] = {"publish": list(identity.grants.publish) if identity else []}
            ok = (
                identity is not None
                and identity.status == "quarantined"
                and not decisions.publish_decision(identity, client_id=client_id, topic=_tx(client_id, "telemetry"))
                and bool(decisions.publish_decision(identity, client_id=client_id, topic=_tx(client_id, "ack")))
            )
        else:
            ok = identity is not None and identity.status == "active"
            evidence["desired"] = {"publish": list(identity.grants.publish) if identity else []}
        return ok, evidence


def live_connections_or_unknown(username: str) -> int | str:
    try:
        return live_connections(username)
    except ManagementUnavailable as exc:
        return f"unknown: {exc}"


def _tx(client_id: str, channel: str) -> str:
    return f"{settings.MQTT_TOPIC_TX_PREFIX}/{client_id}/{channel}"
