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

The hook is an attack surface: its URL carries BROKER_HOOK_SECRET (compared in constant time), it keeps no
session, answers ``deny`` to anything malformed, oversized or unexpected, and never ``allow`` on an error.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import secrets
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt

from security.enforcement import decisions
from security.enforcement.state import identity_desired

from .base import ApplyResult, BrokerUnavailable, HookBrokerAdapter, ProbeResult
from .mqtt_client import connect_code

log = logging.getLogger(__name__)

CHECKS = ("user", "vhost", "resource", "topic")
MAX_BODY_BYTES = 4096
EXCHANGE = "amq.topic"  # where rabbitmq_mqtt publishes and binds
# rabbitmq_mqtt's queue for a client's subscriptions, per QoS: mqtt-subscription-<client id>qos0 / qos1.
SUBSCRIPTION_QUEUE_PREFIX = "mqtt-subscription-"
CAPABILITIES = {
    "name": "rabbitmq",
    "refusal": "a refused login gets CONNACK 'bad user name or password'; a denied publish or subscribe closes the "
    "connection (MQTT 3.1.1)",
    "kick": True,  # the management API drops a session on any node
    "mqtt5": False,  # RabbitMQ 3.10; MQTT 5 comes with 3.13
    "tls_client_certificates": False,  # not wired by the console yet
    "oversize_disconnects": False,  # max_message_size drops the message but keeps the connection
    "rights_change_needs_reconnect": True,  # topic decisions are cached per connection
}

# Denials answered by this process, by reason (the hook's own counters; detection's events() is still to come).
denials: Counter[str] = Counter()


def _answer(decision: decisions.Decision, *, check: str, fields: dict) -> HttpResponse:
    if not decision.allow:
        denials[decision.reason] += 1
        log.info(
            "broker hook denied %s: %s (username=%r client_id=%r ip=%r topic=%r)",
            check,
            decision.reason,
            fields.get("username", "")[:128],
            fields.get("client_id", "")[:128],
            fields.get("ip", ""),
            fields.get("routing_key", "")[:256],
        )
    return HttpResponse(b"allow" if decision.allow else b"deny", content_type="text/plain")


def _deny(reason: str, *, check: str, fields: dict | None = None) -> HttpResponse:
    return _answer(decisions.Decision(False, reason), check=check, fields=fields or {})


def routing_key_to_topic(routing_key: str) -> str:
    """rabbitmq_mqtt writes an MQTT topic as an AMQP routing key: ``/`` becomes ``.``, ``+`` becomes ``*``
    (``#`` stays). Client ids and the topic prefixes contain no ``.``, so the way back is exact for the fleet's
    topics; anything else simply matches no grant."""
    return routing_key.replace(".", "/").replace("*", "+")


def _decide(check: str, fields: dict) -> decisions.Decision:
    username = fields.get("username", "")
    client_id = fields.get("client_id", "") or fields.get("variable_map.client_id", "")
    if not username:
        return decisions.Decision(False, "malformed")
    if check == "user":
        if not client_id:
            # Only MQTT logins carry a client id: a device secret presented on AMQP or to the management UI is refused.
            return decisions.Decision(False, "not_mqtt")
        return decisions.connect_decision(
            identity_desired(username), username=username, password=fields.get("password", ""), client_id=client_id
        )
    identity = identity_desired(username)
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
    topic = routing_key_to_topic(fields.get("routing_key", ""))
    permission = fields.get("permission")
    if permission == "write":
        return decisions.publish_decision(identity, client_id=client_id, topic=topic)
    if permission == "read":
        return decisions.subscribe_decision(identity, client_id=client_id, topic_filter=topic)
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


@csrf_exempt
def auth_hook(request: HttpRequest, secret: str, check: str) -> HttpResponse:
    """POST /broker-hook/rabbitmq/<secret>/<user|vhost|resource|topic>: the body ``allow`` or ``deny``."""
    expected = settings.BROKER_HOOK_SECRET
    if not expected or not hmac.compare_digest(secret.encode(), expected.encode()):
        denials["broker_secret"] += 1
        log.warning("broker hook: a request with a wrong secret from %s", request.META.get("REMOTE_ADDR"))
        return HttpResponse(b"deny", status=403, content_type="text/plain")
    if check not in CHECKS:
        return _deny("malformed", check=check)
    if request.method != "POST":
        return _deny("malformed", check=check)
    try:
        length = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return _deny("malformed", check=check)
    if length > MAX_BODY_BYTES:
        return _deny("oversized", check=check)
    try:
        fields = {key: value for key, value in request.POST.items()}
    except Exception:  # noqa: BLE001 - a body Django cannot parse is a deny, never an error page
        return _deny("malformed", check=check)
    try:
        decision = _decide(check, fields)
    except Exception:  # never allow on an error
        log.exception("broker hook: %s failed; answering deny", check)
        return _deny("error", check=check, fields=fields)
    return _answer(decision, check=check, fields=fields)


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

    def __init__(self, *, host: str | None = None, port: int | None = None, timeout: float | None = None):
        self.host = host or settings.RABBITMQ_MQTT_HOST
        self.port = port or settings.RABBITMQ_MQTT_PORT
        self.timeout = timeout or settings.MQTT_PROBE_TIMEOUT

    def _connect_code(self, username: str, password: str) -> int:
        return connect_code(self.host, self.port, username=username, password=password, timeout=self.timeout)

    def capabilities(self) -> dict:
        return dict(CAPABILITIES)

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

    def probe(self) -> ProbeResult:
        """The console's probe identity logs in through the cluster with its secret (the hook said allow) and with a
        random one (the hook said deny)."""
        started = time.monotonic()
        result = ProbeResult(generation_loaded=True)  # nothing is loaded: every question is asked afresh
        try:
            allowed = self._connect_code(settings.MQTT_PROBE_USERNAME, settings.MQTT_PROBE_PASSWORD)
            refused = self._connect_code(settings.MQTT_PROBE_USERNAME, secrets.token_urlsafe(24))
        except BrokerUnavailable as exc:
            result.error = str(exc)
            raise
        result.allowed_delivered = allowed == 0
        result.refused_credential_refused = refused != 0
        result.ok = result.allowed_delivered and result.refused_credential_refused
        if not result.ok:
            result.error = f"canary through the hook: own secret answered {allowed}, a random one {refused}"
        result.duration_ms = round((time.monotonic() - started) * 1000, 1)
        return result

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
            code = self._connect_code(client_id, secrets.token_urlsafe(24))
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
