"""The broker hook (security/brokers/hook.py) for tests: ``ask`` calls its WSGI application in this process (inside
the test's transaction), as a broker's request would reach it, and ``HookServer`` serves it on a free port for a
real broker to ask."""

from __future__ import annotations

import io
import json
import threading
import urllib.parse
from dataclasses import dataclass

from django.conf import settings

from fleet.ports import free_port
from security.brokers import hook


@dataclass
class Answer:
    status: int
    content_type: str
    body: bytes

    def json(self):
        return json.loads(self.body)


def ask(
    dialect: str,
    check: str,
    fields: dict | None = None,
    *,
    body: bytes | None = None,
    secret: str | None = None,
    method: str = "POST",
    content_type: str | None = None,
    content_length: str | None = None,
) -> Answer:
    """One request to the hook: ``fields`` are sent as RabbitMQ does (a form) or as EMQX does (JSON), or ``body`` as
    it is."""
    if body is None:
        fields = fields or {}
        body = json.dumps(fields).encode() if dialect == "emqx" else urllib.parse.urlencode(fields).encode()
    content_type = content_type or ("application/json" if dialect == "emqx" else "application/x-www-form-urlencoded")
    environ = {
        "REQUEST_METHOD": method,
        "PATH_INFO": f"/{dialect}/{settings.BROKER_HOOK_SECRET if secret is None else secret}/{check}",
        "CONTENT_TYPE": content_type,
        "CONTENT_LENGTH": str(len(body)) if content_length is None else content_length,
        "REMOTE_ADDR": "127.0.0.1",
        "wsgi.input": io.BytesIO(body),
    }
    seen = {}

    def start_response(status, headers):
        seen["status"] = int(status.split()[0])
        seen["headers"] = dict(headers)

    payload = b"".join(hook.answer(environ, start_response))
    return Answer(seen["status"], seen["headers"].get("Content-Type", ""), payload)


class HookServer:
    """The hook's threaded server on a free port of 127.0.0.1, in this process (so it sees the test's database)."""

    def __init__(self):
        self.port = free_port()
        self.server = hook.serve("127.0.0.1", self.port)
        self.thread = threading.Thread(target=self.server.serve_forever, name="broker-hook", daemon=True)

    def url(self, dialect: str = "rabbitmq") -> str:
        return f"http://127.0.0.1:{self.port}/{dialect}/{settings.BROKER_HOOK_SECRET}"

    def start(self) -> HookServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
