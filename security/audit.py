"""The audit trail: a request-scoped context (who, from where, which request) and the one function
services call to record what they changed."""

from __future__ import annotations

import contextlib
import contextvars
import ipaddress
import re
import uuid
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import models

from .models import AuditEvent


@dataclass(frozen=True)
class AuditContext:
    source_address: str | None = None
    request_id: str = ""
    service: str | None = None


_NO_CONTEXT = AuditContext()
_context: contextvars.ContextVar[AuditContext | None] = contextvars.ContextVar("audit_context", default=None)
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def current_context() -> AuditContext:
    return _context.get() or _NO_CONTEXT


@contextlib.contextmanager
def audit_context(*, service: str | None = None, source_address: str | None = None, request_id: str = ""):
    """For tasks and consumers: everything recorded inside is attributed to this service."""
    token = _context.set(
        AuditContext(source_address=source_address, request_id=request_id or uuid.uuid4().hex, service=service)
    )
    try:
        yield
    finally:
        _context.reset(token)


def _source_address(request) -> str | None:
    address = request.META.get("REMOTE_ADDR")
    if getattr(settings, "AUDIT_TRUST_X_FORWARDED_FOR", False):
        forwarded = request.META.get("HTTP_X_FORWARDED_FOR", "").split(",")[0].strip()
        address = forwarded or address
    try:
        return str(ipaddress.ip_address(address)) if address else None
    except ValueError:
        return None


class AuditContextMiddleware:
    """Gives every request an id (kept from X-Request-ID when sane) and remembers where it came from."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        incoming = request.META.get("HTTP_X_REQUEST_ID", "")
        request_id = incoming if _REQUEST_ID_RE.match(incoming) else uuid.uuid4().hex
        request.request_id = request_id
        token = _context.set(AuditContext(source_address=_source_address(request), request_id=request_id))
        try:
            response = self.get_response(request)
        finally:
            _context.reset(token)
        response["X-Request-ID"] = request_id
        return response


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, models.Model):
        return str(value)
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def actor_label(actor) -> str:
    """Who did it, as the audit log shows it: the username, a label given as a string, or the service named by the
    current context ("service:rotation"), else "system"."""
    if getattr(actor, "is_authenticated", False):
        return actor.get_username()
    if isinstance(actor, str):
        return actor
    context = current_context()
    return f"service:{context.service}" if context.service else "system"


def audit_record_many(*, actor, action: str, items, object_type: str = "device", batch_size: int = 500) -> int:
    """One event per (object id, after) item, written in bulk (a batch of 10,000 devices is 10,000 events, not 10,000
    round trips); the same fields audit_record fills, from the same context."""
    context = current_context()
    user = actor if getattr(actor, "is_authenticated", False) else None
    label = actor_label(actor)[:150]
    events = [
        AuditEvent(
            actor=user,
            actor_label=label,
            action=action,
            object_type=object_type,
            object_id=str(object_id)[:128],
            after=_jsonable(after) if after is not None else None,
            source_address=context.source_address,
            request_id=context.request_id,
        )
        for object_id, after in items
    ]
    AuditEvent.objects.bulk_create(events, batch_size=batch_size)
    return len(events)


def audit_record(
    *,
    actor,
    action: str,
    target: models.Model | None = None,
    object_type: str = "",
    object_id: str = "",
    before: dict | None = None,
    after: dict | None = None,
) -> AuditEvent:
    """Record one change. ``actor`` is a user, or None for the service named by the current context."""
    context = current_context()
    if target is not None:
        object_type = object_type or target._meta.model_name
        object_id = object_id or str(getattr(target, "client_id", None) or target.pk)
    user = actor if getattr(actor, "is_authenticated", False) else None
    label = actor_label(actor)
    return AuditEvent.objects.create(
        actor=user,
        actor_label=label[:150],
        action=action,
        object_type=object_type,
        object_id=str(object_id)[:128],
        before=_jsonable(before) if before is not None else None,
        after=_jsonable(after) if after is not None else None,
        source_address=context.source_address,
        request_id=context.request_id,
    )
