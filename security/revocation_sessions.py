"""A revoked device's live session and what it leaves on the broker (issue 5, docs/revocation.md).

* **Session evidence**: the apply that carries a revocation starts a ``SessionWatcher`` (security/brokers/sessions.py)
  while it builds the policy, waits for it to be subscribed right before the reload signal, and hands it to the
  verifier, which records what the broker logged about the device's session ("session dropped at ...").
* **Purge** (``settings.REVOCATION_PURGE_SESSIONS``, on by default): after the revocation is verified, the device's
  persistent session (queued QoS 1 messages) is discarded and the retained messages on its own channels are cleared,
  against the real broker: for each device a one-time random secret, held only in this process's memory, is
  rendered for the device's username with a temporary ACL block (read its own tx channels, write its own rx
  channels: exactly what clearing them needs), the broker reloads, the purge connects as the device (MQTT 5, clean
  start off, session expiry 0: the broker discards the session when it disconnects), clears the retained messages
  it finds, and the files the broker had before are put back. The database never renders those lines, so if the
  console dies midway the reconcile job removes them; and they are useless to anyone else (the secret never left
  memory). It runs off the latency path, when no revocation arrived for ``REVOCATION_PURGE_QUIET_SECONDS`` (it costs
  two reloads), at most ``REVOCATION_PURGE_MAX_DELAY_SECONDS`` after the verification; durable (the pending state is
  on the DeviceAction's evidence) and retried by its task and by the reconcile job.
"""

from __future__ import annotations

import logging
from datetime import UTC, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Max, Min, Q
from django.utils import timezone

from devices.models import Device

from . import services
from .audit import audit_context, audit_record
from .brokers import get_adapter
from .brokers.render import SESSIONS_USERNAME
from .brokers.sessions import SessionWatcher
from .models import BrokerState, DeviceAction, EnforcementChange

logger = logging.getLogger(__name__)

PURGE_BATCH = 100  # devices per purge (one pair of reloads)
PURGE_MAX_ATTEMPTS = 5  # then the purge shows as failed on the device page (the reconcile job stops retrying)
BUSY_KINDS = ("device.revoke", "device.quarantine", "bulk.revoke", "bulk.quarantine")

_watcher: SessionWatcher | None = None


# --- session evidence ---------------------------------------------------------------------------------------------


def session_watch_start(*, up_to_id: int | None, adapter) -> SessionWatcher | None:
    """Called by the apply before it builds the policy: a watcher when this apply carries revocations (it connects
    in its own thread meanwhile), else None."""
    global _watcher
    stale = session_watch_take()  # one per apply: close one an apply left behind without a verification
    if stale is not None:
        stale.close()
    cfg = getattr(adapter, "cfg", None)
    if up_to_id is None or cfg is None or adapter.process() is None:
        return None  # nothing to watch: no revocation here, or no broker running (no session survives a restart)
    client_ids = set(
        DeviceAction.objects.filter(
            action=DeviceAction.Action.REVOKE,
            state__in=[DeviceAction.State.PENDING, DeviceAction.State.FAILED],
            change_id__lte=up_to_id,
            change__state__in=[EnforcementChange.State.PENDING, EnforcementChange.State.FAILED],
        ).values_list("client_id", flat=True)[:10_000]
    )
    if not client_ids:
        return None
    _watcher = SessionWatcher(
        host=cfg.host,
        port=cfg.port,
        username=SESSIONS_USERNAME,
        password=settings.MQTT_SESSIONS_PASSWORD,
        client_ids=frozenset(client_ids),
    ).start()
    return _watcher


def session_watch_take() -> SessionWatcher | None:
    """For the verifier (same process, right after the apply): the watcher of the last apply, once. A watcher left
    from an earlier apply that nobody read is closed here; it also closes itself after a minute."""
    global _watcher
    watcher, _watcher = _watcher, None
    return watcher


# --- purge ------------------------------------------------------------------------------------------------------


def _pending_purges():
    return DeviceAction.objects.filter(
        action=DeviceAction.Action.REVOKE, state=DeviceAction.State.VERIFIED, evidence__purge__state="pending"
    )


PURGE_SCHEDULED_KEY = "fleetkeeper:revocation-purge-scheduled"


def purge_enqueue(*, countdown: float | None = None) -> None:
    """Queue the purge task unless one is already queued: every verification asks for one, and a chain per revocation
    (each waiting for the quiet period by re-queueing itself) would crowd the worker that applies the revocations.
    A Redis key marks "one is queued"; it expires shortly after the task was due, so a lost task is queued again (by
    the next verification or the reconcile job)."""
    import redis

    from .tasks import purge_revoked_sessions

    countdown = settings.REVOCATION_PURGE_QUIET_SECONDS if countdown is None else max(0.0, countdown)

    def send():
        try:
            client = redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=2)
            if not client.set(PURGE_SCHEDULED_KEY, "1", nx=True, ex=int(countdown) + 60):
                return  # one is queued already; it takes every pending purge
            purge_revoked_sessions.apply_async(countdown=countdown)
        except Exception:  # Redis down: the pending state is durable, the reconcile job queues it
            logger.exception("could not queue the session purge; the reconcile job does")

    transaction.on_commit(send)


def purge_task_started() -> None:
    """The queued purge task runs: the next request may queue one again."""
    import redis

    try:
        redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=2).delete(PURGE_SCHEDULED_KEY)
    except Exception:
        logger.warning("could not clear the purge marker in Redis; it expires by itself")


def purge_resume() -> int:
    """For the reconcile job: pending purges whose task was lost are queued again."""
    count = _pending_purges().count()
    if count:
        purge_enqueue(countdown=0)
    return count


def _defer_seconds(rows: list[DeviceAction]) -> float:
    """0 when the purge may run now; else how long to wait. It waits for a quiet broker (no revocation or quarantine
    for REVOCATION_PURGE_QUIET_SECONDS, none pending), but not beyond REVOCATION_PURGE_MAX_DELAY_SECONDS."""
    now = timezone.now()
    quiet = timedelta(seconds=settings.REVOCATION_PURGE_QUIET_SECONDS)
    oldest = min((r.verified_at for r in rows if r.verified_at), default=now)
    if now - oldest >= timedelta(seconds=settings.REVOCATION_PURGE_MAX_DELAY_SECONDS):
        return 0.0
    busy = EnforcementChange.objects.filter(kind__in=BUSY_KINDS).aggregate(
        last=Max("created"),
        pending=Min("created", filter=Q(state__in=[EnforcementChange.State.PENDING, EnforcementChange.State.FAILED])),
    )
    if busy["pending"] is not None:
        return max(1.0, settings.REVOCATION_PURGE_QUIET_SECONDS / 2)
    if busy["last"] is not None and now - busy["last"] < quiet:
        return max(0.5, (busy["last"] + quiet - now).total_seconds())
    return 0.0


def revoked_sessions_purge(*, force: bool = False) -> dict:
    """Purge the sessions and retained messages of up to PURGE_BATCH verified revocations (see the module docstring).
    Returns what happened; ``{"deferred": seconds}`` when it should run later."""
    rows = list(_pending_purges().order_by("id")[:PURGE_BATCH])
    if not rows:
        return {"purged": 0}
    if not force:
        wait = _defer_seconds(rows)
        if wait:
            return {"deferred": wait, "pending": len(rows)}
    adapter = get_adapter()
    with services.broker_lock():
        # Again under the lock: another worker's purge may have done some of them meanwhile.
        rows = list(_pending_purges().filter(pk__in=[r.pk for r in rows]).order_by("id"))
        # Never for a device that came back: only revoked devices without a credential are purged.
        revoked = set(
            Device.objects.filter(
                client_id__in=[r.client_id for r in rows], status=Device.Status.REVOKED, credential__isnull=True
            ).values_list("client_id", flat=True)
        )
        for row in rows:
            if row.client_id not in revoked:
                _purge_settle(row, {"state": "skipped", "why": "the device is no longer revoked"})
        rows = [r for r in rows if r.client_id in revoked]
        if not rows:
            return {"purged": 0}
        if services._pending_max_id() is not None:
            return {"deferred": 2.0, "why": "enforcement changes are pending; they go first"}
        state = BrokerState.load()
        done = adapter.purge_sessions(
            [r.client_id for r in rows],
            applied_digest=state.applied_digest,
            probe_secret=settings.MQTT_PROBE_PASSWORD,
            before_login=_purge_announce,
        )
        if "deferred" in done:  # the files are not what the last apply wrote: the reconcile job repairs them first
            return {"deferred": float(settings.MQTT_RECONCILE_SECONDS), "why": done["deferred"]}
        outcomes, error = done["outcomes"], done["error"]
        purged = 0
        for row in rows:
            outcome = outcomes.get(row.client_id)
            if outcome is not None and not outcome["error"]:
                _purge_settle(row, {"state": "done", **outcome})
                purged += 1
            else:
                why = (outcome or {}).get("error") or error or "not attempted"
                attempts = (row.evidence.get("purge") or {}).get("attempts", 0) + 1
                _purge_settle(
                    row,
                    {
                        "state": "pending" if attempts < PURGE_MAX_ATTEMPTS else "failed",
                        "attempts": attempts,
                        "last_error": why,
                    },
                )
    more = _pending_purges().filter(pk__gt=max(r.pk for r in rows)).exists() if rows else False
    return {"purged": purged, "failed": len(rows) - purged, "error": error, "more": more}


PURGE_CONNECT_KEY = "fleetkeeper:revocation-purge-connect:{client_id}"
PURGE_CONNECT_TTL = 600  # seconds: long enough for a broker-log reader that batches or lags


def _purge_announce(client_ids: list[str]) -> None:
    """Before the purge logs in as revoked devices: say so in Redis, so a broker-log reader (the detection monitor)
    can tell the console's own purge login from a revoked device coming back (``purge_expected``)."""
    try:
        client = services._lock_client()
        pipe = client.pipeline(transaction=False)
        for client_id in client_ids:
            pipe.set(PURGE_CONNECT_KEY.format(client_id=client_id), _now_ms(), ex=PURGE_CONNECT_TTL)
        pipe.execute()
    except Exception:
        logger.warning("could not announce the session purge in Redis; the monitor may report its logins")


def purge_expected(client_id: str) -> bool:
    """For the detection monitor: did the console's session purge log in as this (revoked) client id lately?"""
    try:
        return bool(services._lock_client().exists(PURGE_CONNECT_KEY.format(client_id=client_id)))
    except Exception:
        return False


def _now_ms() -> str:
    return timezone.now().astimezone(UTC).isoformat(timespec="milliseconds")


def _purge_settle(row: DeviceAction, purge: dict) -> None:
    with transaction.atomic():
        current = DeviceAction.objects.select_for_update().filter(pk=row.pk).first()
        if current is None or current.state != DeviceAction.State.VERIFIED:
            return
        evidence = dict(current.evidence or {})
        evidence["purge"] = purge
        DeviceAction.objects.filter(pk=row.pk).update(evidence=evidence)
        row.evidence = evidence
        if purge["state"] in ("done", "failed"):
            with audit_context(service="revocation-purge"):
                audit_record(
                    actor=None,
                    action="device.revoke_purged" if purge["state"] == "done" else "device.revoke_purge_failed",
                    object_type="device",
                    object_id=row.client_id,
                    after={"action_id": row.pk, **purge},
                )
