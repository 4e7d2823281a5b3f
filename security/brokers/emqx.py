"""EMQX 5 (BROKER_BACKEND=emqx): the same hook in EMQX's dialect, and the adapter that kicks and bans through EMQX's
REST API. **Not run against a real EMQX**: EMQX does not install on this project's machines. What this module
speaks is what EMQX 5 documents, and tests/security/test_emqx_contract.py holds it to those documented requests
and answers (docs/broker.md, "Choosing a broker").

What EMQX documents, and what follows from it:
- HTTP authentication: a POST whose JSON body the operator templates. The console expects
  ``{"username": "${username}", "password": "${password}", "clientid": "${clientid}", "peerhost": "${peerhost}"}``
  and answers ``200 {"result": "allow" | "deny", "is_superuser": false}``. A 4xx/5xx answer means *ignore* to
  EMQX (the next authenticator decides): the hook answers a deny as 200 with ``"deny"``, always.
- HTTP authorization: a POST per publish and subscribe, templated as ``{"username": "${username}", "clientid":
  "${clientid}", "peerhost": "${peerhost}", "action": "${action}", "topic": "${topic}", "qos": "${qos}",
  "retain": "${retain}"}``; answered ``200 {"result": "allow" | "deny"}``. EMQX reads 204 as allow and a 200 with a
  body it does not understand as *ignore*: the hook never answers either. Configure ``authorization.no_match =
  deny`` and ``authorization.deny_action = disconnect`` so that a deny ends the session as on the other brokers.
- EMQX caches authorization answers per client (``authorization.cache``, a minute by default), so a change of
  rights ends the live session (``rights_change_needs_reconnect``), as on RabbitMQ.
- The REST API (an API key and secret, HTTP basic): ``DELETE /api/v5/clients/{clientid}`` kicks a client anywhere
  in the cluster and discards its session (204; 404 when there is none); ``GET /api/v5/clients/{clientid}`` tells
  whether it is connected; ``POST /api/v5/banned`` with ``{"as": "clientid", "who": ..., "reason": ...}`` refuses
  a client id before any authenticator is asked, ``DELETE /api/v5/banned/clientid/{who}`` lifts it. A revoked
  device is banned as well as denied, so that a misconfigured authentication chain cannot let it back in.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
import urllib.error
import urllib.parse
import urllib.request

from django.conf import settings

from security.enforcement import cache, decisions
from security.enforcement.login import login_decision
from security.enforcement.state import identity_desired

from .base import ApplyResult, BrokerUnavailable
from .hook_adapter import HookBrokerAdapter

CHECKS = ("authn", "authz")
ACTIONS = {"publish", "subscribe"}
CAPABILITIES = {
    "name": "emqx",
    "refusal": "a refused login gets CONNACK 'not authorized'; with authorization.deny_action = disconnect a denied "
    "publish or subscribe ends the session (MQTT 5 clients get the reason code first)",
    "kick": True,  # DELETE /api/v5/clients/{clientid}, any node
    "mqtt5": True,
    "shared_subscriptions": True,
    "events": "hook",
    "tls_client_certificates": False,  # not wired by the console yet
    "oversize_disconnects": True,  # mqtt.max_packet_size: documented, not measured here
    "rights_change_needs_reconnect": True,  # authorization answers are cached per client
    "denial_disconnects": True,  # authorization.deny_action = disconnect
    "filters_each_delivery": False,  # a subscription is authorized once, when it is made
    "foreign_client_id": "refused",  # the hook refuses a client id other than the username
    "verified_here": False,  # contract tests only: EMQX does not install on this project's machines
}


def answer_bytes(decision: decisions.Decision) -> tuple[str, str, bytes]:
    """Always 200 with an explicit result: EMQX reads 4xx/5xx as ignore, 204 as allow."""
    body = {"result": "allow" if decision.allow else "deny"}
    return "200 OK", "application/json", json.dumps(body).encode()


def decide(check: str, body: bytes, *, content_type: str = "") -> tuple[decisions.Decision, dict]:
    try:
        fields = json.loads(body.decode("utf-8")) if body else None
    except (UnicodeDecodeError, ValueError):
        return decisions.Decision(False, "malformed"), {}
    if not isinstance(fields, dict) or not all(isinstance(v, (str, int, bool)) for v in fields.values()):
        return decisions.Decision(False, "malformed"), {}
    text = {key: str(value) for key, value in fields.items()}
    said = {
        "username": text.get("username", ""),
        "client_id": text.get("clientid", ""),
        "ip": text.get("peerhost", ""),
        "topic": text.get("topic", ""),
        "permission": text.get("action", ""),
    }
    if check not in CHECKS:
        return decisions.Decision(False, "malformed"), said
    username, client_id = said["username"], said["client_id"]
    if not username or not client_id:
        return decisions.Decision(False, "anonymous" if check == "authn" else "malformed"), said
    if check == "authn":
        return login_decision(username, password=text.get("password", ""), client_id=client_id), said
    action = said["permission"]
    if action not in ACTIONS or not said["topic"]:
        return decisions.Decision(False, "malformed"), said
    identity = cache.identity(username)
    if action == "publish":
        return decisions.publish_decision(identity, client_id=client_id, topic=said["topic"]), said
    return decisions.subscribe_decision(identity, client_id=client_id, topic_filter=said["topic"]), said


# --- the REST API --------------------------------------------------------------------------------------------------


class ApiUnavailable(Exception):
    """No node's REST API answered."""


def _request(method: str, path: str, *, payload: dict | None = None) -> tuple[int, object]:
    """Send to the first node that answers: (status, decoded JSON or None). Raises ApiUnavailable."""
    token = base64.b64encode(f"{settings.EMQX_API_KEY}:{settings.EMQX_API_SECRET}".encode()).decode()
    errors = []
    for base in settings.EMQX_API_URLS:
        if urllib.parse.urlsplit(base).scheme not in ("http", "https"):
            errors.append(f"{base}: not an http(s) URL")
            continue
        request = urllib.request.Request(  # noqa: S310 (http or https only: checked above)
            base.rstrip("/") + path,
            method=method,
            data=None if payload is None else json.dumps(payload).encode(),
            headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=settings.EMQX_API_TIMEOUT) as response:  # noqa: S310
                raw = response.read()
                return response.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            return exc.code, None
        except OSError as exc:
            errors.append(f"{base}: {exc}")
    raise ApiUnavailable("; ".join(errors) or "no EMQX API URL configured")


def _client_path(client_id: str) -> str:
    return f"/api/v5/clients/{urllib.parse.quote(client_id, safe='')}"


def kick(client_ids: list[str]) -> dict[str, str]:
    """End each client's session wherever it is connected: "dropped" or "not connected"."""
    outcome = {}
    for client_id in client_ids:
        status, _ = _request("DELETE", _client_path(client_id))
        if status in (200, 204):
            outcome[client_id] = "dropped"
        elif status == 404:
            outcome[client_id] = "not connected"
        else:
            raise ApiUnavailable(f"EMQX answered {status} kicking {client_id}")
    return outcome


def connected(client_id: str) -> bool:
    status, body = _request("GET", _client_path(client_id))
    if status == 404:
        return False
    if status != 200 or not isinstance(body, dict):
        raise ApiUnavailable(f"EMQX answered {status} looking up {client_id}")
    return bool(body.get("connected"))


def ban(client_id: str, *, reason: str) -> None:
    status, _ = _request("POST", "/api/v5/banned", payload={"as": "clientid", "who": client_id, "reason": reason})
    if status not in (200, 201, 400):  # 400: already banned (EMQX answers ALREADY_EXISTED)
        raise ApiUnavailable(f"EMQX answered {status} banning {client_id}")


def unban(client_id: str) -> None:
    status, _ = _request("DELETE", f"/api/v5/banned/clientid/{urllib.parse.quote(client_id, safe='')}")
    if status not in (200, 204, 404):
        raise ApiUnavailable(f"EMQX answered {status} lifting the ban on {client_id}")


# --- the adapter ---------------------------------------------------------------------------------------------------


class EMQXCluster(HookBrokerAdapter):
    """BROKER_BACKEND=emqx: the hook answers every new question from the desired state; applying a change bans or
    unbans the identity (by its status), ends its live session, then the canary."""

    name = "emqx"

    capability_table = CAPABILITIES

    def disconnect(self, usernames: list[str]) -> dict[str, str]:
        try:
            return kick(usernames)
        except ApiUnavailable as exc:
            raise BrokerUnavailable(f"No EMQX REST API answered: {exc}") from exc

    def purge(self, usernames: list[str]) -> dict[str, str]:
        """EMQX's kick discards the session (its queued messages) with the connection."""
        dropped = self.disconnect(usernames)
        return {name: "deleted" if state == "dropped" else "none" for name, state in dropped.items()}

    def apply(self, client_ids: list[str]) -> ApplyResult:
        started = time.monotonic()
        names = sorted({c for c in client_ids if c})
        try:
            for name in names:
                identity = identity_desired(name)
                if identity is None or not identity.may_connect:
                    ban(name, reason="fleetkeeper: revoked")
                else:
                    unban(name)
        except ApiUnavailable as exc:
            raise BrokerUnavailable(f"No EMQX REST API answered: {exc}") from exc
        dropped = self.disconnect(names) if names else {}
        kicked_ms = round((time.monotonic() - started) * 1000, 1)
        return ApplyResult(
            digest="",
            written=False,
            reloaded=False,
            process=None,
            probe=self.probe(),
            timings={"kick_ms": kicked_ms, "sessions": dropped},
        )

    def verify_action(self, *, action: str, client_id: str) -> tuple[bool, dict]:
        identity = identity_desired(client_id)
        evidence: dict = {"broker": f"emqx {self.host}:{self.port}", "checked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ")}
        try:
            live = connected(client_id)
        except ApiUnavailable as exc:
            live = None
            evidence["connected"] = f"unknown: {exc}"
        else:
            evidence["connected"] = live
        if action == "revoke":
            code = self.connect_code(client_id, secrets.token_urlsafe(24))
            evidence["connect_attempt"] = {"username": client_id, "password": "random, never issued", "code": code}
            ok = code != 0 and (identity is None or not identity.may_connect) and live is False
        else:
            wanted = "quarantined" if action == "quarantine" else "active"
            ok = identity is not None and identity.status == wanted
            evidence["desired"] = {"publish": list(identity.grants.publish) if identity else []}
        return ok, evidence
