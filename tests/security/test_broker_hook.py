"""The broker hook (security/brokers/hook.py) as a broker reaches it, in both dialects: RabbitMQ's form posts and
EMQX 5's JSON (a contract test: the requests and answers EMQX documents, never run against a real EMQX here). What
it answers, what it refuses unasked, its events for detection, its rate and brute-force limits, and the decision
cache behind it (real Redis): invalidated by the outbox, never stale, and the database when Redis is down."""

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from devices.models import Device
from fleet.celery import app as celery_app
from fleet.ports import free_port
from security import services
from security.brokers import emqx
from security.brokers.base import BrokerUnavailable
from security.brokers.rabbitmq import routing_key_to_topic
from security.enforcement import cache, events
from security.enforcement.state import identity_desired
from security.enforcement.store import redis_client
from tests.factories import DeviceFactory
from tests.support.hook import ask

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def fresh_decisions(settings):
    """The test database is new for each test, the Redis is not: no cached answer from an earlier test is used.
    The console enforces through RabbitMQ unless a test says EMQX."""
    settings.BROKER_BACKEND = "rabbitmq"
    cache.invalidate_all()
    yield
    celery_app.control.purge()  # what the changes' commits queued: no worker runs in this module


@pytest.fixture
def on_emqx(settings):
    settings.BROKER_BACKEND = "emqx"


@pytest.fixture
def hook_device(operator):
    row = DeviceFactory(client_id="device-hook-1")
    return services.credential_issue(actor=operator, device=row).password


def rabbit(check, **fields):
    return ask("rabbitmq", check, fields).body


LOGIN = {"username": "device-hook-1", "vhost": "/", "client_id": "device-hook-1"}


def test_routing_keys_map_back_to_mqtt_topics():
    assert routing_key_to_topic("tx.device-a.telemetry") == "tx/device-a/telemetry"
    assert routing_key_to_topic("rx.device-a.#") == "rx/device-a/#"
    assert routing_key_to_topic("rx.*.command") == "rx/+/command"


def test_rabbitmq_the_hook_allows_exactly_what_the_core_allows(hook_device):
    assert rabbit("user", password=hook_device, **LOGIN) == b"allow"
    assert rabbit("user", password="wrong", **LOGIN) == b"deny"
    assert rabbit("user", password=hook_device, **{**LOGIN, "client_id": "device-other"}) == b"deny"
    assert rabbit("user", username="device-hook-1", password=hook_device) == b"deny"  # AMQP: no client id
    assert rabbit("vhost", ip="127.0.0.1", **LOGIN) == b"allow"
    assert rabbit("vhost", ip="127.0.0.1", **{**LOGIN, "vhost": "other"}) == b"deny"
    queue = {"resource": "queue", "permission": "configure", **LOGIN}
    assert rabbit("resource", name="mqtt-subscription-device-hook-1qos1", **queue) == b"allow"
    assert rabbit("resource", name="mqtt-subscription-device-otherqos1", **queue) == b"deny"
    exchange = {"resource": "exchange", "name": "amq.topic", **LOGIN}
    assert rabbit("resource", permission="write", **exchange) == b"allow"
    assert rabbit("resource", permission="configure", **exchange) == b"deny"
    topic = {"resource": "topic", "name": "amq.topic", "username": "device-hook-1", "vhost": "/"}
    topic["variable_map.client_id"] = "device-hook-1"
    assert rabbit("topic", permission="write", routing_key="tx.device-hook-1.telemetry", **topic) == b"allow"
    assert rabbit("topic", permission="write", routing_key="tx.device-other.telemetry", **topic) == b"deny"
    assert rabbit("topic", permission="read", routing_key="rx.device-hook-1.#", **topic) == b"allow"
    assert rabbit("topic", permission="read", routing_key="#", **topic) == b"deny"
    assert rabbit("topic", permission="read", routing_key="$SYS.#", **topic) == b"deny"


def test_rabbitmq_anything_malformed_is_a_deny_and_a_wrong_broker_secret_a_403(hook_device):
    login = {**LOGIN, "password": hook_device}
    wrong = ask("rabbitmq", "user", login, secret="not-the-secret")
    assert wrong.status == 403 and wrong.body == b"deny"
    assert ask("rabbitmq", "nonsense", login).body == b"deny"
    assert ask("rabbitmq", "user", login, method="GET").body == b"deny"
    assert ask("rabbitmq", "user", {**login, "padding": "x" * 10_000}).body == b"deny"  # oversized
    assert ask("rabbitmq", "user", login, content_length="not a number").body == b"deny"
    assert rabbit("topic", username="device-hook-1") == b"deny"  # missing fields
    assert rabbit("user") == b"deny"
    garbage = ask("rabbitmq", "user", body=b"\xff\xfe%%%")
    assert garbage.status == 200 and garbage.body == b"deny"
    twice = ask("rabbitmq", "user", body=b"username=device-hook-1&username=device-other&password=x&client_id=y")
    assert twice.body == b"deny"
    assert ask("nonsense", "user", login).status == 404
    assert rabbit("user", **login) == b"allow"  # and it still answers the right question right


def test_every_deny_is_an_event_with_what_the_broker_said(hook_device, settings):
    start = events.latest_id()
    rabbit("user", password="wrong", **LOGIN)
    rabbit(
        "topic",
        username="device-hook-1",
        vhost="/",
        resource="topic",
        name="amq.topic",
        permission="write",
        routing_key="tx.device-other.telemetry",
        **{"variable_map.client_id": "device-hook-1"},
    )
    rabbit("user", password=hook_device, **{**LOGIN, "client_id": "device-other"})
    ask("emqx", "authn", {"username": "device-hook-1", "password": hook_device, "clientid": "device-hook-1"})
    settings.BROKER_BACKEND = "emqx"
    ask(
        "emqx",
        "authz",
        {
            "username": "device-hook-1",
            "clientid": "device-hook-1",
            "action": "subscribe",
            "topic": "$SYS/#",
            "peerhost": "10.1.2.3",
        },
    )
    settings.BROKER_BACKEND = "rabbitmq"
    ask("rabbitmq", "user", LOGIN, secret="forged")
    rabbit("user", password=hook_device, **LOGIN)  # an allow is no event
    seen = events.read(start)
    assert [(e.broker, e.check, e.kind) for e in seen] == [
        ("rabbitmq", "user", "bad_secret"),
        ("rabbitmq", "topic", "publish_denied"),
        ("rabbitmq", "user", "client_id_mismatch"),
        ("emqx", "authn", "not_this_broker"),  # the console enforces through RabbitMQ: EMQX's question is refused
        ("emqx", "authz", "subscribe_denied"),
        ("rabbitmq", "user", "broker_secret"),
    ]
    assert seen[0].username == "device-hook-1" and seen[0].client_id == "device-hook-1"
    assert seen[1].topic == "tx/device-other/telemetry" and seen[1].permission == "write"
    assert seen[2].client_id == "device-other"
    assert seen[4].ip == "10.1.2.3" and seen[4].topic == "$SYS/#"


def test_a_username_with_too_many_failed_logins_is_refused_unchecked(hook_device, settings):
    settings.BROKER_HOOK_LOGIN_FAILURES = 3
    DeviceFactory(client_id="device-hook-2")
    for _ in range(3):
        assert rabbit("user", password="guess", **LOGIN) == b"deny"
    start = events.latest_id()
    assert rabbit("user", password=hook_device, **LOGIN) == b"deny"  # even the right secret, for this window
    assert [e.kind for e in events.read(start)] == ["too_many_failures"]
    other = {**LOGIN, "username": "device-hook-2", "client_id": "device-hook-2"}
    assert rabbit("user", password="guess", **other) == b"deny"
    assert [e.kind for e in events.read(start)][-1] == "bad_secret"  # another username is still checked


@pytest.mark.parametrize("dialect", ["rabbitmq", "emqx"])
def test_failed_logins_do_not_lock_the_console_out(dialect, settings):
    """Anyone who reaches the broker can fail logins as the consumer, and the canary fails one on every apply: the
    console's identities are not locked out (their secrets are random), but each failure is still an event."""
    settings.BROKER_BACKEND = dialect
    settings.BROKER_HOOK_LOGIN_FAILURES = 3
    name, secret = settings.MQTT_PROBE_USERNAME, settings.MQTT_PROBE_PASSWORD

    def login(password):
        if dialect == "rabbitmq":
            return rabbit("user", username=name, password=password, client_id=name, vhost="/") == b"allow"
        answer = ask("emqx", "authn", {"username": name, "password": password, "clientid": name})
        return answer.json()["result"] == "allow"

    start = events.latest_id()
    assert [login("guess") for _ in range(5)] == [False] * 5
    assert login(secret)
    assert [e.kind for e in events.read(start)] == ["bad_secret"] * 5


def test_beyond_its_rate_the_hook_answers_deny_and_says_so(hook_device, settings):
    settings.BROKER_HOOK_RATE, settings.BROKER_HOOK_BURST = 0.001, 3
    answers = [rabbit("user", password=hook_device, **LOGIN) for _ in range(5)]
    assert answers == [b"allow"] * 3 + [b"deny"] * 2
    start = events.latest_id()
    assert rabbit("vhost", ip="127.0.0.1", **LOGIN) == b"deny"
    assert [e.kind for e in events.read(start)] == ["rate_limited"]


# --- the decision cache ---------------------------------------------------------------------------------------


def test_answers_come_from_the_cache_until_the_outbox_invalidates_them(
    hook_device, support, django_capture_on_commit_callbacks, settings
):
    settings.BROKER_BACKEND = "rabbitmq"
    rabbit("user", password=hook_device, **LOGIN)
    hits = cache.stats["hit"]
    assert rabbit("user", password=hook_device, **LOGIN) == b"allow"
    assert rabbit("vhost", ip="127.0.0.1", **LOGIN) == b"allow"
    assert cache.stats["hit"] == hits + 2, "the login and the vhost were answered from the cache"
    with django_capture_on_commit_callbacks(execute=True):
        services.device_revoke(actor=support, device=Device.objects.get(client_id="device-hook-1"), reason="stolen")
    celery_app.control.purge()  # the apply task the commit queued: no worker runs in this module
    assert rabbit("user", password=hook_device, **LOGIN) == b"deny"
    assert rabbit("vhost", ip="127.0.0.1", **LOGIN) == b"deny"


def test_an_answer_read_before_a_change_is_never_used_after_it(hook_device, support, settings):
    """The race the counters close: a hook reads the database, the change commits and invalidates, then the hook
    stores what it read. That entry is never used."""
    entry_key = f"{settings.ENFORCEMENT_CACHE_PREFIX}:id:device-hook-1"
    version_key = f"{settings.ENFORCEMENT_CACHE_PREFIX}:v:device-hook-1"
    gen_key = f"{settings.ENFORCEMENT_CACHE_PREFIX}:gen"
    r = redis_client()
    gen, version = int(r.get(gen_key) or 0), int(r.get(version_key) or 0)  # what a hook reads first
    stale = identity_desired("device-hook-1")  # then the database, still active
    services.device_revoke(actor=support, device=Device.objects.get(client_id="device-hook-1"), reason="stolen")
    cache.invalidate(["device-hook-1"])  # the change's commit
    r.set(
        entry_key,
        json.dumps({"g": gen, "v": version, "i": {**stale.__dict__, "grants": {"publish": [], "subscribe": []}}}),
    )
    assert rabbit("user", password=hook_device, **LOGIN) == b"deny"
    assert cache.identity("device-hook-1").may_connect is False


def test_with_redis_down_the_database_answers_and_never_allows_what_it_would_not(
    hook_device, support, operator, settings
):
    assert rabbit("user", password=hook_device, **LOGIN) == b"allow"  # cached now
    settings.ENFORCEMENT_CACHE_URL = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    services.device_revoke(actor=support, device=Device.objects.get(client_id="device-hook-1"), reason="stolen")
    with pytest.raises(cache.CacheUnavailable):
        cache.invalidate(["device-hook-1"])
    fallbacks = cache.stats["fallback"]
    assert rabbit("user", password=hook_device, **LOGIN) == b"deny"
    assert cache.stats["fallback"] > fallbacks
    DeviceFactory(client_id="device-hook-3")
    secret = services.credential_issue(actor=operator, device=Device.objects.get(client_id="device-hook-3")).password
    login = {**LOGIN, "username": "device-hook-3", "client_id": "device-hook-3"}
    assert rabbit("user", password=secret, **login) == b"allow"  # the fleet still connects


def test_the_outbox_stays_pending_until_the_invalidation_got_through(hook_device, support, settings):
    """BROKER_BACKEND=emqx with its REST API and the cache's Redis both away: the apply raises, the row stays
    pending (the reconcile retries); nothing is applied on faith."""
    settings.BROKER_BACKEND = "emqx"
    settings.EMQX_API_URLS = [f"http://127.0.0.1:{free_port()}"]
    settings.ENFORCEMENT_CACHE_URL = f"redis://127.0.0.1:{free_port()}/0"
    services.device_revoke(actor=support, device=Device.objects.get(client_id="device-hook-1"), reason="stolen")
    with pytest.raises(BrokerUnavailable):
        services.enforcement_apply(coalesce=False)
    row = services.EnforcementChange.objects.filter(client_id="device-hook-1", kind="device.revoke").latest("id")
    assert row.state == "pending" and row.attempts == 1 and row.last_error


# --- EMQX 5: the documented contract -----------------------------------------------------------------------------


def emqx_authn(**fields):
    return ask("emqx", "authn", fields)


def test_emqx_authentication_answers_as_emqx_documents(hook_device, on_emqx):
    allowed = emqx_authn(username="device-hook-1", password=hook_device, clientid="device-hook-1", peerhost="10.0.0.9")
    assert allowed.status == 200 and allowed.content_type == "application/json"
    assert allowed.json() == {"result": "allow"}  # no is_superuser: a device is never a superuser
    for fields in (
        {"username": "device-hook-1", "password": "wrong", "clientid": "device-hook-1"},
        {"username": "device-hook-1", "password": hook_device, "clientid": "device-other"},
        {"username": "", "password": "", "clientid": "x"},
        {"username": "intruder", "password": "guess", "clientid": "intruder"},
    ):
        answer = emqx_authn(**fields)
        # Always 200 with an explicit deny: EMQX reads a 4xx/5xx as "ignore" and asks the next authenticator.
        assert answer.status == 200 and answer.json() == {"result": "deny"}, fields


def test_emqx_authorization_answers_as_emqx_documents(hook_device, on_emqx):
    def authz(action, topic, clientid="device-hook-1"):
        answer = ask(
            "emqx",
            "authz",
            {
                "username": "device-hook-1",
                "clientid": clientid,
                "peerhost": "10.0.0.9",
                "action": action,
                "topic": topic,
                "qos": 1,
                "retain": False,
            },
        )
        assert answer.status == 200 and answer.content_type == "application/json"  # never 204 (EMQX: allow)
        return answer.json()["result"]

    assert authz("publish", "tx/device-hook-1/telemetry") == "allow"
    assert authz("subscribe", "rx/device-hook-1/#") == "allow"
    assert authz("publish", "tx/device-other/telemetry") == "deny"
    assert authz("subscribe", "#") == "deny"
    assert authz("subscribe", "$SYS/#") == "deny"
    assert authz("publish", "tx/device-hook-1/telemetry", clientid="device-other") == "deny"
    assert authz("all", "tx/device-hook-1/telemetry") == "deny"  # an action the console does not know


@pytest.mark.parametrize(
    "body",
    [b"", b"not json", b"[1, 2]", b'{"username": {"nested": 1}}', b"\xff\xfe", json.dumps({"username": "x"}).encode()],
)
def test_emqx_malformed_requests_are_a_200_deny(body, hook_device, on_emqx):
    for check in ("authn", "authz"):
        answer = ask("emqx", check, body=body)
        assert answer.status == 200 and answer.json() == {"result": "deny"}, (check, body)


def test_emqx_a_wrong_broker_secret_is_a_deny_emqx_cannot_read_as_ignore(hook_device, on_emqx):
    answer = ask(
        "emqx",
        "authn",
        {"username": "device-hook-1", "password": hook_device, "clientid": "device-hook-1"},
        secret="forged",
    )
    assert answer.status == 200 and answer.json() == {"result": "deny"}


class FakeEmqxApi:
    """EMQX 5's REST API as its documentation describes the calls the console makes (clients, banned), on a free
    port: what the adapter sends is recorded, and the answers are the documented ones."""

    def __init__(self, connected=()):
        self.connected = set(connected)
        self.banned: set[str] = set()
        self.requests: list[tuple[str, str, str, dict | None]] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, status, body=None):
                raw = b"" if body is None else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                payload = json.loads(self.rfile.read(length)) if length else None
                api.requests.append((self.command, self.path, self.headers.get("Authorization", ""), payload))
                parts = self.path.split("/")
                if self.path.startswith("/api/v5/clients/"):
                    client = parts[4]
                    if self.command == "DELETE":
                        if client in api.connected:
                            api.connected.discard(client)
                            return self._answer(204)
                        return self._answer(404, {"code": "CLIENTID_NOT_FOUND", "message": "Client ID not found"})
                    if client in api.connected:
                        return self._answer(200, {"clientid": client, "connected": True})
                    return self._answer(404, {"code": "CLIENTID_NOT_FOUND", "message": "Client ID not found"})
                if self.path == "/api/v5/banned" and self.command == "POST":
                    if payload["who"] in api.banned:
                        return self._answer(400, {"code": "ALREADY_EXISTS", "message": "already banned"})
                    api.banned.add(payload["who"])
                    return self._answer(200, payload)
                if self.path.startswith("/api/v5/banned/clientid/") and self.command == "DELETE":
                    if parts[5] in api.banned:
                        api.banned.discard(parts[5])
                        return self._answer(204)
                    return self._answer(404, {"code": "NOT_FOUND", "message": "not banned"})
                return self._answer(404, {"code": "NOT_FOUND"})

            do_GET = do_POST = do_DELETE = _handle

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def emqx_api(settings):
    api = FakeEmqxApi(connected={"device-hook-1"})
    settings.EMQX_API_URLS = [f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{api.port}"]  # node 1 is down
    settings.EMQX_API_KEY, settings.EMQX_API_SECRET = "fk-key", "fk-secret"
    yield api
    api.stop()


def test_emqx_kick_ban_and_lookup_use_the_documented_calls_on_the_first_node_that_answers(emqx_api):
    assert emqx.connected("device-hook-1") is True
    assert emqx.kick(["device-hook-1", "device-gone"]) == {"device-hook-1": "dropped", "device-gone": "not connected"}
    assert emqx.connected("device-hook-1") is False
    emqx.ban("device-hook-1", reason="fleetkeeper: revoked")
    emqx.ban("device-hook-1", reason="fleetkeeper: revoked")  # already banned: not an error
    assert emqx_api.banned == {"device-hook-1"}
    emqx.unban("device-hook-1")
    emqx.unban("device-hook-1")  # not banned: not an error
    assert emqx_api.banned == set()
    methods_paths = [(method, path) for method, path, _, _ in emqx_api.requests]
    assert methods_paths[:3] == [
        ("GET", "/api/v5/clients/device-hook-1"),
        ("DELETE", "/api/v5/clients/device-hook-1"),
        ("DELETE", "/api/v5/clients/device-gone"),
    ]
    assert ("POST", "/api/v5/banned") in methods_paths
    assert ("DELETE", "/api/v5/banned/clientid/device-hook-1") in methods_paths
    ban_payload = next(p for m, path, _, p in emqx_api.requests if path == "/api/v5/banned")
    assert ban_payload == {"as": "clientid", "who": "device-hook-1", "reason": "fleetkeeper: revoked"}
    assert {auth for _, _, auth, _ in emqx_api.requests} == {"Basic " + base64.b64encode(b"fk-key:fk-secret").decode()}


def test_emqx_api_down_everywhere_is_broker_unavailable(settings):
    settings.EMQX_API_URLS = [f"http://127.0.0.1:{free_port()}"]
    with pytest.raises(BrokerUnavailable):
        emqx.EMQXCluster().disconnect(["device-hook-1"])
