"""The HTTP auth hook that clustered brokers ask at every connect, publish and subscribe: a WSGI application of its
own, on its own listener (BROKER_HOOK_HOST:BROKER_HOOK_PORT; ``manage.py run_hook``, or gunicorn
``fleet.hook_wsgi:application`` in production), never on the console's public port.

It is lean on purpose: no middleware, no session, no template, no ORM object; one cache hit (the decision cache,
security/enforcement/cache.py) or one indexed query per question (../shared/rabbitmq-notes.md: the connect rate is
bound by the hook). Each dialect (``rabbitmq``, ``emqx``) turns its broker's request into the core's decisions.

    POST /<dialect>/<BROKER_HOOK_SECRET>/<check>

It answers only the dialect of BROKER_BACKEND (a RabbitMQ question while the console enforces through Mosquitto is
a deny). It is an attack surface, and answers like one:
- the broker authenticates with BROKER_HOOK_SECRET in the path (RabbitMQ 3.10's HTTP backend sends no headers of
  its own), compared in constant time; a wrong one is a deny (a 403 for RabbitMQ; a 200 deny for EMQX, which reads
  a 4xx as "ask the next authenticator") and an event;
- anything malformed, oversized (> MAX_BODY_BYTES), of the wrong method or unknown is ``deny``; an error is never an
  ``allow``;
- a token bucket per process (BROKER_HOOK_RATE, BROKER_HOOK_BURST) answers ``deny`` beyond the rate, and a username
  with more than BROKER_HOOK_LOGIN_FAILURES failed logins in BROKER_HOOK_LOGIN_WINDOW seconds is refused without its
  secret being checked (security/enforcement/events.py keeps that count in Redis, shared by every process);
- every deny is an event for detection (security/enforcement/events.py), with the username, client id, source
  address and topic the broker said.
"""

from __future__ import annotations

import hmac
import logging
import socket
import threading
import time
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from django.conf import settings
from django.db import close_old_connections

from security.enforcement import events
from security.enforcement.decisions import Decision

from . import emqx, rabbitmq

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 4096
DIALECTS = {"rabbitmq": rabbitmq, "emqx": emqx}


class _Bucket:
    """A token bucket, shared by the threads of one process."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tokens = 0.0
        self.stamp = 0.0
        self.rate = self.burst = None

    def take(self) -> bool:
        rate, burst = settings.BROKER_HOOK_RATE, settings.BROKER_HOOK_BURST
        now = time.monotonic()
        with self.lock:
            if (rate, burst) != (self.rate, self.burst):  # first use, or the settings changed (tests do)
                self.rate, self.burst, self.tokens, self.stamp = rate, burst, float(burst), now
            self.tokens = min(float(burst), self.tokens + (now - self.stamp) * rate)
            self.stamp = now
            if self.tokens < 1:
                return False
            self.tokens -= 1
            return True


bucket = _Bucket()


def _respond(start_response, status: str, content_type: str, body: bytes) -> list[bytes]:
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body)))])
    return [body]


def _read_body(environ) -> bytes | None:
    """The request body, or None when it is larger than MAX_BODY_BYTES (or says so)."""
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return None
    if length > MAX_BODY_BYTES or length < 0:
        return None
    return environ["wsgi.input"].read(length) if length else b""


def application(environ, start_response):
    """The hook as a server runs it (``serve``, fleet.hook_wsgi): each request on a thread that owns its database
    connection, dropped when it broke or aged out, as Django's request signals do for the console."""
    close_old_connections()
    try:
        return answer(environ, start_response)
    finally:
        close_old_connections()


def answer(environ, start_response):
    """The WSGI application itself: one broker question, one answer."""
    parts = environ.get("PATH_INFO", "").strip("/").split("/")
    dialect = DIALECTS.get(parts[0]) if parts else None
    if dialect is None or len(parts) != 3:
        return _respond(start_response, "404 Not Found", "text/plain", b"deny")
    _, secret, check = parts
    expected = settings.BROKER_HOOK_SECRET
    if not expected or not hmac.compare_digest(secret.encode(), expected.encode()):
        refusal = Decision(False, "broker_secret")
        events.record(refusal, broker=parts[0], check=check, fields={"ip": environ.get("REMOTE_ADDR")})
        log.warning("broker hook: a request with a wrong secret from %s", environ.get("REMOTE_ADDR"))
        return _respond(start_response, *dialect.answer_bytes(refusal))
    if settings.BROKER_BACKEND != parts[0]:
        # Only the broker the console enforces through is answered: the outbox invalidates the decision cache for
        # that broker alone, so a hook left running beside another one could answer from stale entries.
        refusal = Decision(False, "not_this_broker")
        events.record(refusal, broker=parts[0], check=check, fields={})
        return _respond(start_response, *dialect.answer_bytes(refusal))
    if not bucket.take():
        status, content_type, body = dialect.answer_bytes(Decision(False, "rate_limited"))
        events.record(Decision(False, "rate_limited"), broker=parts[0], check=check, fields={})
        return _respond(start_response, status, content_type, body)
    body = _read_body(environ) if environ.get("REQUEST_METHOD") == "POST" else None
    if body is None:
        reason = "oversized" if environ.get("REQUEST_METHOD") == "POST" else "malformed"
        decision, fields = Decision(False, reason), {}
    else:
        try:
            decision, fields = dialect.decide(check, body, content_type=environ.get("CONTENT_TYPE", ""))
        except Exception:  # noqa: BLE001 - never allow on an error
            log.exception("broker hook: %s %s failed; answering deny", parts[0], check)
            decision, fields = Decision(False, "error"), {}
    if not decision.allow:
        events.record(decision, broker=parts[0], check=check, fields=fields)
    status, content_type, payload = dialect.answer_bytes(decision)
    return _respond(start_response, status, content_type, payload)


# --- a small threaded server (manage.py run_hook and the tests); production runs gunicorn (fleet.hook_wsgi) -------


class _Handler(WSGIRequestHandler):
    def setup(self) -> None:
        super().setup()
        # Small request/response pairs stall on delayed ACKs without it (rabbitmq-notes.md).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass  # the hook's denials are events and log lines of their own; no access log per question


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


def serve(host: str, port: int) -> _ThreadingServer:
    """A threaded server for the hook, not yet serving: call ``serve_forever`` (``shutdown`` stops it)."""
    return make_server(host, port, application, server_class=_ThreadingServer, handler_class=_Handler)
