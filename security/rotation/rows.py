"""The bookkeeping every rotation step shares: the history steps, bulk moves between states, per-row updates, bulk
audit events, chunking, enqueueing after commit, and the alerts a rotation raises. No step of the handover lives
here (security/rotation/services.py is the entry point: start; handover.py: deliver, confirm, switch; tick.py:
completion, deadlines, re-sends)."""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Iterable
from datetime import datetime

from django.db import connection, models, transaction
from django.db.models import F, Func, Value
from django.utils import timezone

from devices.models import Device
from security.models import (
    CredentialRotation,
)

log = logging.getLogger(__name__)

State = CredentialRotation.State
OPEN_STATES = CredentialRotation.OPEN_STATES
ROTATABLE_STATUSES = (Device.Status.ACTIVE, Device.Status.QUARANTINED)
CHUNK = 500  # rows per IN (...) query / bulk statement
SWITCH_BUDGET_KEY = "fleetkeeper:rotation-switches"
MAX_HISTORY = 50  # steps kept per rotation (re-sends of a device offline for weeks would grow it without end)


def _step(step: str, outcome: str = "ok", detail: str = "", at: datetime | None = None, **extra) -> dict:
    entry = {"at": (at or timezone.now()).isoformat(), "step": step, "outcome": outcome}
    if detail:
        entry["detail"] = detail[:500]
    entry.update(extra)
    return entry


def _append(history: list, entry: dict) -> list:
    history = list(history or []) + [entry]
    return history if len(history) <= MAX_HISTORY else history[:1] + history[-(MAX_HISTORY - 1) :]


class HistoryAppend(Func):
    """``history`` with one more step, computed by the database: one UPDATE appends the same step to every row of a
    batch (a bulk_update of a JSON column row by row costs ~3 ms a row on SQLite; this costs ~nothing)."""

    output_field = models.JSONField()

    def __init__(self, entry: dict):
        super().__init__(F("history"), Value(json.dumps(entry, default=str)))

    def as_sql(self, compiler, connection, **extra):
        column, params = compiler.compile(self.source_expressions[0])
        entry = self.source_expressions[1].value
        if connection.vendor == "postgresql":
            return f"(COALESCE({column}, '[]'::jsonb) || jsonb_build_array(%s::jsonb))", [*params, entry]
        if connection.vendor == "sqlite":
            return f"json_insert(COALESCE({column}, '[]'), '$[#]', json(%s))", [*params, entry]
        raise NotImplementedError(f"appending to a JSON array is not written for {connection.vendor}")


def _bulk_step(ids: list[int], entry: dict, *, guard: dict | None = None, **fields) -> int:
    """Move many rows at once: set ``fields`` and append ``entry`` to their history, only where ``guard`` (e.g. the
    state they are expected in) still holds. Returns how many rows moved."""
    moved = 0
    for chunk in _chunks(ids, CHUNK):
        moved += (
            CredentialRotation.objects.filter(pk__in=chunk, **(guard or {}))
            .order_by()
            .update(history=HistoryAppend(entry), updated=timezone.now(), **fields)
        )
    return moved


def _update_per_row(model, columns: list[str], rows: list[tuple], *, key: str = "id") -> None:
    """Different values per row (a new hash, a new command id) in one executemany: Django's bulk_update builds a
    CASE per column and row, which is quadratic in practice; this is one prepared statement run many times."""
    if not rows:
        return
    quote = connection.ops.quote_name
    sets = ", ".join(f"{quote(model._meta.get_field(c).column)} = %s" for c in columns)
    # Identifiers from the model's own metadata, quoted; every value is a parameter.
    sql = f"UPDATE {quote(model._meta.db_table)} SET {sets} WHERE {quote(key)} = %s"  # noqa: S608
    with connection.cursor() as cursor:
        cursor.executemany(sql, rows)


def _placeholder_command_id() -> str:
    """Until the first delivery: unique, never sent to anyone."""
    return f"new-{secrets.token_hex(12)}"


def command_id_for(rotation_id: int, attempt: int) -> str:
    """Unique per delivery (a stale ack of an earlier delivery never confirms a later secret)."""
    return f"rot{rotation_id}-{attempt}-{secrets.token_hex(6)}"


def _chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _enqueue(task, ids: list[int], *, countdown: float | None = None) -> None:
    """After commit; a Redis outage leaves the rows durable for the tick to pick up."""

    def send():
        try:
            if countdown:
                task.apply_async(args=[ids], countdown=countdown)
            else:
                task.delay(ids)
        except Exception:
            log.exception("could not enqueue %s for %d rotations; the rotation tick resumes them", task.name, len(ids))

    transaction.on_commit(send)


def _alert(*, kind: str, row: CredentialRotation, summary: str, extra: dict | None = None) -> None:
    from security.detection.alerts import alert_raise

    alert_raise(
        kind=kind,
        subject=row.client_id,
        client_id=row.client_id,
        device=row.device if row.device_id else None,
        summary=summary,
        evidence={
            "rotation": row.pk,
            "state": row.state,
            "attempts": row.attempts,
            "delivered_at": row.delivered_at.isoformat() if row.delivered_at else None,
            "switched_at": row.switched_at.isoformat() if row.switched_at else None,
            **(extra or {}),
        },
    )


def _switch_change_id(history: list) -> int | None:
    for entry in reversed(history or []):
        if entry.get("step") == "switch" and entry.get("change"):
            return entry["change"]
    return None
