"""Identity and enforcement services: device credentials, status changes that alter what the broker enforces,
the enforcement outbox and its application to the broker (apply, reconcile, probe).

Every change that alters enforcement writes an EnforcementChange row in the same transaction as the change itself,
and enqueues ``security.apply_enforcement`` after commit. The apply takes a Redis lock, so changes arriving together
are rendered and reloaded once (coalescing), and a broker that is down leaves the rows pending for the reconcile job.
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import redis
from django.conf import settings
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.db.models import Max
from django.utils import timezone

from devices.models import Device
from security.enforcement import cache as decision_cache
from security.enforcement.secrets import hash_secret

from .audit import audit_record, current_context
from .brokers import broker_config, console_identities, get_adapter
from .brokers.base import ApplyResult, BrokerRejected, BrokerUnavailable
from .brokers.hook_adapter import HookBrokerAdapter
from .brokers.render import DeviceRow, RenderedPolicy, passwd_drift, policy_render
from .models import BrokerState, DeviceCredential, EnforcementChange
from .permissions import require
from .pki.services import device_certificates_revoke

logger = logging.getLogger(__name__)

SECRET_BYTES = 32  # 256 bits from the operating system's CSPRNG
MAX_SECRET_LENGTH = 256
BROKER_LOCK = "fleetkeeper:broker-apply"
URGENT_KINDS = ("device.revoke", "device.quarantine")  # applied without the coalescing window (issue 5)
MAX_ALERTED_UNKNOWN = 100  # audit events per reconcile for unknown credentials (the rest are counted)


class BrokerBusy(Exception):
    """Another apply held the broker lock for too long; retried like an unavailable broker."""


class ProbeFailed(Exception):
    """The canary probe did not confirm the policy after a reload; the rows are marked failed and the task retries
    (a busy broker can fail a probe once; a broker that truly does not enforce keeps failing, visibly)."""


def _authorise(actor, permission: str) -> None:
    """A user needs the permission. ``actor=None`` is a service (a task, the simulator, a scheduled job) and is
    accepted only inside ``audit_context(service=...)``, so the audit log always names who acted."""
    if actor is None:
        if current_context().service:
            return
        raise PermissionDenied("No actor: call this as a user, or inside audit_context(service=...) as a service.")
    require(actor, permission)


# --- credentials -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IssuedCredential:
    """What the caller shows once. Never stored, never put in a session, a redirect or a log."""

    device: Device
    username: str
    password: str
    replaced: bool
    change: EnforcementChange

    @property
    def client_id(self) -> str:
        return self.device.client_id


def _identifier_forms(value: str) -> set[str]:
    """A device identifier in the forms people write it: as is, and with separators removed (MACs: aa:bb:..,
    aa-bb-.., aabb.ccdd.., aabbcc..; serials with or without dashes)."""
    value = (value or "").strip().lower()
    if not value:
        return set()
    bare = re.sub(r"[\s:.\-_]", "", value)
    forms = {value, bare}
    if len(bare) == 12 and re.fullmatch(r"[0-9a-f]{12}", bare):
        pairs = [bare[i : i + 2] for i in range(0, 12, 2)]
        forms |= {":".join(pairs), "-".join(pairs), ".".join(bare[i : i + 4] for i in range(0, 12, 4))}
    return {f for f in forms if len(f) >= 4}


def operator_secret_validate(*, device: Device, secret: str) -> None:
    """An operator-supplied secret must be long and not derived from what anyone can read off the device.

    The broker hashes with few iterations (docs/broker.md): that is safe only for high-entropy secrets, so the
    minimum length is high on purpose."""
    minimum = settings.MQTT_OPERATOR_SECRET_MIN_LENGTH
    errors = []
    if len(secret) < minimum:
        errors.append(
            f"The secret is {len(secret)} characters; use at least {minimum} (or let the console generate one)."
        )
    if len(secret) > MAX_SECRET_LENGTH:
        errors.append(f"The secret is longer than {MAX_SECRET_LENGTH} characters.")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in secret):
        errors.append("The secret must not contain spaces or control characters.")
    if len(set(secret)) < 8:
        errors.append("The secret repeats too few characters to be random.")
    lowered = secret.lower()
    bare = re.sub(r"[\s:.\-_]", "", lowered)
    for label, value in (("client id", device.client_id), ("serial", device.serial), ("MAC address", device.mac)):
        if any(form in lowered or form in bare for form in _identifier_forms(value)):
            errors.append(f"The secret contains the device's {label}; anyone who can see the device could guess it.")
    if errors:
        raise ValidationError({"password": errors})


def credential_issue(*, actor, device: Device, secret: str | None = None) -> IssuedCredential:
    """Issue (or re-issue) the device's broker secret. Re-issuing replaces the old one: the reload that follows
    disconnects a session still using it (Mosquitto re-authenticates every client on SIGHUP)."""
    _authorise(actor, "devices.issue_credentials")
    source = DeviceCredential.Source.GENERATED
    if secret:
        operator_secret_validate(device=device, secret=secret)
        source = DeviceCredential.Source.OPERATOR
    else:
        secret = secrets.token_urlsafe(SECRET_BYTES)
    stored = hash_secret(secret, iterations=settings.MQTT_PASSWORD_ITERATIONS)
    with transaction.atomic():
        device = Device.objects.select_for_update().get(pk=device.pk)
        if device.status in (Device.Status.REVOKED, Device.Status.DECOMMISSIONED):
            raise ValidationError(
                f"{device.client_id} is {device.get_status_display().lower()}: "
                "reinstate it before issuing a credential."
            )
        existing = DeviceCredential.objects.filter(device=device).first()
        before = {"source": existing.source, "issued_at": existing.issued_at} if existing else None
        credential, _ = DeviceCredential.objects.update_or_create(
            device=device,
            defaults={
                "password_hash": stored,
                "source": source,
                "issued_at": timezone.now(),
                "issued_by": actor if getattr(actor, "is_authenticated", False) else None,
            },
        )
        audit_record(
            actor=actor,
            action="credential.reissue" if existing else "credential.issue",
            target=device,
            before=before,
            after={"source": source, "issued_at": credential.issued_at, "iterations": credential.iterations},
        )
        change = enforcement_enqueue(
            kind="credential.reissue" if existing else "credential.issue",
            client_id=device.client_id,
            summary="new secret replaces the old one" if existing else "first secret",
            actor=actor,
        )
    return IssuedCredential(
        device=device, username=device.client_id, password=secret, replaced=existing is not None, change=change
    )


# --- status changes that alter enforcement -----------------------------------------------------------------

_TRANSITIONS = {
    "quarantine": ({Device.Status.ACTIVE}, Device.Status.QUARANTINED, "devices.quarantine_device"),
    "revoke": ({Device.Status.ACTIVE, Device.Status.QUARANTINED}, Device.Status.REVOKED, "devices.revoke_device"),
    "reinstate": (
        {Device.Status.QUARANTINED, Device.Status.REVOKED},
        Device.Status.ACTIVE,
        "devices.reinstate_device",
    ),
    "decommission": (
        {Device.Status.ACTIVE, Device.Status.QUARANTINED, Device.Status.REVOKED},
        Device.Status.DECOMMISSIONED,
        "devices.change_device",
    ),
}


def _device_status_change(*, actor, device: Device, action: str, reason: str = "") -> Device:
    allowed_from, target, permission = _TRANSITIONS[action]
    _authorise(actor, permission)
    with transaction.atomic():
        device = Device.objects.select_for_update().get(pk=device.pk)
        if device.status not in allowed_from:
            raise ValidationError(
                f"{device.client_id} is {device.get_status_display().lower()}; it cannot be {action}d from that state."
            )
        before = {"status": device.status}
        device.status = target
        device.full_clean()
        device.save(update_fields=["status", "updated"])
        removed, certificates_revoked = False, 0
        if target in (Device.Status.REVOKED, Device.Status.DECOMMISSIONED):
            # A revoked secret must never come back: reinstating a revoked device needs a new one.
            removed = DeviceCredential.objects.filter(device=device).delete()[0] > 0
            # Its certificates go on the CRL, and a live TLS session is cut off (a CRL alone does not).
            certificates_revoked = device_certificates_revoke(
                actor=actor, device=device, reason=reason or f"device {action}"
            )
        audit_record(
            actor=actor,
            action=f"device.{action}",
            target=device,
            before=before,
            after={
                "status": target,
                "reason": reason,
                "credential_removed": removed,
                "certificates_revoked": certificates_revoked,
            },
        )
        enforcement_enqueue(kind=f"device.{action}", client_id=device.client_id, summary=reason[:255], actor=actor)
    return device


def device_quarantine(*, actor, device: Device, reason: str = "") -> Device:
    """The device keeps only the repair path: rx/<id>/credentials, rx/<id>/firmware and tx/<id>/ack."""
    return _device_status_change(actor=actor, device=device, action="quarantine", reason=reason)


def device_revoke(*, actor, device: Device, reason: str = "") -> Device:
    """The device's credential is deleted and disappears from the broker; the reload drops its session."""
    return _device_status_change(actor=actor, device=device, action="revoke", reason=reason)


def device_reinstate(*, actor, device: Device, reason: str = "") -> Device:
    return _device_status_change(actor=actor, device=device, action="reinstate", reason=reason)


def device_decommission(*, actor, device: Device, reason: str = "") -> Device:
    return _device_status_change(actor=actor, device=device, action="decommission", reason=reason)


# --- the outbox ---------------------------------------------------------------------------------------------


def enforcement_enqueue(*, kind: str, client_id: str = "", summary: str = "", actor=None) -> EnforcementChange:
    """A durable row, then (after commit) the task. Call inside the transaction that makes the change.
    Also for other parts of the console: e.g. deleting a device should enqueue ``device.delete``."""
    from .tasks import apply_enforcement

    change = EnforcementChange.objects.create(
        kind=kind,
        client_id=client_id,
        summary=summary,
        requested_by=actor if getattr(actor, "is_authenticated", False) else None,
    )
    if settings.BROKER_BACKEND != "mosquitto":
        # The hook answers from the decision cache: once the change is committed, no cached answer about it is used.
        transaction.on_commit(lambda: _invalidate_decisions([client_id]))
    transaction.on_commit(lambda: _enqueue_apply(apply_enforcement, change.pk))
    return change


def enforcement_change_wait(change_id: int, *, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for an outbox change to be applied and verified on the broker (its row turns
    ``applied``, whichever adapter applies it); True once it is. Never changes anything."""
    deadline = time.monotonic() + max(0.0, timeout)
    while True:
        state = EnforcementChange.objects.filter(pk=change_id).values_list("state", flat=True).first()
        if state == EnforcementChange.State.APPLIED:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def _invalidate_decisions(client_ids: list[str]) -> None:
    try:
        decision_cache.invalidate_changes(client_ids)
    except decision_cache.CacheUnavailable:  # the outbox's apply invalidates again, and stays pending until it can
        logger.warning("could not invalidate the decision cache for %s; the outbox will", client_ids)


def _enqueue_apply(task, change_id: int) -> None:
    try:
        task.delay(change_id)
    except Exception:  # Redis down: the row is durable, the reconcile job applies it
        logger.exception("could not enqueue the enforcement change %s; the reconcile job will apply it", change_id)


def reconcile_enqueue(*, actor=None, trigger: str = "manual") -> None:
    from .tasks import reconcile_broker

    if actor is not None:
        require(actor, "security.sync_policy")
        audit_record(actor=actor, action="broker.sync_requested", object_type="broker", object_id="mosquitto")
    transaction.on_commit(lambda: reconcile_broker.delay(trigger=trigger))


# --- the desired policy and its application ---------------------------------------------------------------


def policy_desired() -> RenderedPolicy:
    """The policy the database asks for: one query for the devices, whatever the fleet size."""
    rows = (
        Device.objects.filter(status__in=[Device.Status.ACTIVE, Device.Status.QUARANTINED], credential__isnull=False)
        .order_by()
        .values_list("client_id", "status", "credential__password_hash")
    )
    devices = list(map(DeviceRow._make, rows.iterator(chunk_size=5000)))
    return policy_render(cfg=broker_config(), devices=devices, console=console_identities())


_lock_clients: dict[str, redis.Redis] = {}


def _lock_client() -> redis.Redis:
    """One client (and connection pool) per Redis URL and process: a revocation need not open a new connection."""
    client = _lock_clients.get(settings.REDIS_URL)
    if client is None:
        client = _lock_clients[settings.REDIS_URL] = redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=2)
    return client


BROKER_LOCK_TTL = 15  # seconds; renewed every 5 s while held, so a worker killed holding it blocks others <= 15 s


@contextlib.contextmanager
def broker_lock(timeout: float = 30.0):
    """One apply at a time across every worker (also keeps two canaries from taking over each other's session).

    The lock lives BROKER_LOCK_TTL seconds and a small thread renews it while its holder works: an apply that takes
    long keeps it, and a worker killed while holding it (SIGKILL, OOM) frees it within seconds instead of blocking
    every revocation until a long expiry."""
    client = _lock_client()
    lock = client.lock(BROKER_LOCK, timeout=BROKER_LOCK_TTL, blocking_timeout=timeout, thread_local=False)
    try:
        acquired = lock.acquire()
    except redis.ConnectionError:
        # No Redis means no Celery worker either (it is their broker): a command running alone (run_broker's
        # start-up reconcile) is the only one applying, so it may proceed without the lock.
        logger.warning("Redis is unreachable: applying the broker policy without the cross-worker lock")
        yield
        return
    if not acquired:
        raise BrokerBusy("another broker apply held the lock")
    done = threading.Event()

    def renew():
        while not done.wait(BROKER_LOCK_TTL / 3):
            with contextlib.suppress(Exception):
                lock.reacquire()

    renewer = threading.Thread(target=renew, name="fleetkeeper-broker-lock", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        done.set()
        renewer.join(timeout=1.0)
        with contextlib.suppress(Exception):
            lock.release()


def _record_state(
    *,
    state: BrokerState,
    result: ApplyResult | None = None,
    error: str = "",
    reachable: bool | None = None,
    drift: dict | None = None,
) -> None:
    now = timezone.now()
    state.adapter = settings.MQTT_BROKER_ADAPTER.rsplit(".", 1)[-1]
    state.last_checked = now
    state.last_error = error
    if reachable is not None:
        state.reachable = reachable
    if result is not None:
        state.reachable = True
        state.applied_digest = result.digest
        if result.reloaded:
            state.last_reload = now
        if result.process is not None:
            state.broker_pid, state.broker_started = result.process.pid, result.process.started
        if result.probe is not None:
            state.last_probe_at = now
            state.last_probe_ok = result.probe.ok
            state.last_probe = result.probe.as_dict()
    if drift is not None:
        state.drift = drift
        if drift:
            state.drift_found_at = now
    state.save()


def _settle(*, up_to_id: int | None, result: ApplyResult) -> int:
    """Mark every pending (or failed) change up to ``up_to_id`` as applied or failed by the probe's verdict."""
    if up_to_id is None:
        return 0
    rows = EnforcementChange.objects.filter(
        id__lte=up_to_id, state__in=[EnforcementChange.State.PENDING, EnforcementChange.State.FAILED]
    )
    probe = result.probe.as_dict() if result.probe else None
    if probe is not None and result.timings:
        probe["apply"] = result.timings  # per-step timings (the revocation benchmark's breakdown)
    if result.probe is not None and result.probe.ok:
        return rows.update(
            state=EnforcementChange.State.APPLIED,
            applied_at=timezone.now(),
            digest=result.digest,
            probe=probe,
            last_error="",
            updated=timezone.now(),
        )
    return rows.update(
        state=EnforcementChange.State.FAILED,
        digest=result.digest,
        probe=probe,
        last_error=(result.probe.error if result.probe else "no probe result")[:2000],
        updated=timezone.now(),
    )


def _note_attempt(*, up_to_id: int | None, error: str) -> None:
    if up_to_id is None:
        return
    from django.db.models import F

    EnforcementChange.objects.filter(
        id__lte=up_to_id, state__in=[EnforcementChange.State.PENDING, EnforcementChange.State.FAILED]
    ).update(attempts=F("attempts") + 1, last_error=error[:2000], updated=timezone.now())


def _pending_max_id() -> int | None:
    return EnforcementChange.objects.filter(
        state__in=[EnforcementChange.State.PENDING, EnforcementChange.State.FAILED]
    ).aggregate(m=Max("id"))["m"]


def enforcement_apply(*, change_id: int | None = None, coalesce: bool = True) -> ApplyResult | None:
    """Apply every pending change at once: render, write, reload, probe, then settle the rows.

    Coalescing: the first task waits out the window after its change was made, takes the lock and applies all
    rows pending by then; the tasks of the other rows find nothing left and return."""
    entered_at = time.time()
    if change_id is not None:
        change = EnforcementChange.objects.filter(pk=change_id).only("state", "created", "kind").first()
        if change is None or change.state == EnforcementChange.State.APPLIED:
            return None
        # A single revoke or quarantine does not wait for the window: the person on call waits for it. Others
        # arriving meanwhile still coalesce through the lock (the next apply takes every pending row).
        if coalesce and change.kind not in URGENT_KINDS:
            wait = (
                change.created + timedelta(milliseconds=settings.MQTT_APPLY_COALESCE_MS) - timezone.now()
            ).total_seconds()
            if wait > 0:
                time.sleep(wait)
    with broker_lock():
        if (
            change_id is not None
            and not EnforcementChange.objects.filter(
                pk=change_id, state__in=[EnforcementChange.State.PENDING, EnforcementChange.State.FAILED]
            ).exists()
        ):
            return None  # applied by another task in the meantime (coalesced)
        return _apply_locked(force_reload=False, entered_at=entered_at)


def _apply_locked(*, force_reload: bool, drift: dict | None = None, entered_at: float | None = None) -> ApplyResult:
    started = time.monotonic()
    locked_at = time.time()
    up_to_id = _pending_max_id()
    state = BrokerState.load()
    adapter = get_adapter()
    if isinstance(adapter, HookBrokerAdapter):
        return _apply_through_hook(adapter, up_to_id=up_to_id, state=state, entered_at=entered_at or locked_at)
    # Revocations of active devices on top of an unchanged broker: cut the lines out of the loaded files instead of
    # rendering the whole fleet again (issue 5's latency target; the reconcile still renders in full every minute).
    from .revocation import policy_fast_revoke
    from .revocation_sessions import session_watch_start

    # The broker's own word on the sessions a revocation drops: a watcher subscribed to its log before the reload
    # (connecting meanwhile, so it costs the revocation nothing). None when no revocation is in this apply.
    watcher = session_watch_start(up_to_id=up_to_id, adapter=adapter)
    policy = None if force_reload else policy_fast_revoke(up_to_id=up_to_id, state=state, adapter=adapter)
    path = "fast" if policy is not None else "full"
    policy = policy or policy_desired()
    built_ms = round((time.monotonic() - started) * 1000, 1)
    try:
        try:
            result = adapter.apply(
                policy, force_reload=force_reload, before_reload=watcher.wait_ready if watcher is not None else None
            )
        except BaseException:
            if watcher is not None:
                watcher.close()
            raise
    except BrokerUnavailable as exc:
        _note_attempt(up_to_id=up_to_id, error=str(exc))
        _record_state(state=state, error=str(exc), reachable=False, drift=drift)
        raise
    except BrokerRejected as exc:
        _note_attempt(up_to_id=up_to_id, error=str(exc))
        EnforcementChange.objects.filter(id__lte=up_to_id or 0, state=EnforcementChange.State.PENDING).update(
            state=EnforcementChange.State.FAILED
        )
        _record_state(state=state, error=str(exc), reachable=True, drift=drift)
        raise
    result.timings = {
        "path": path,
        "entered_at": entered_at or locked_at,  # the task reached the apply (wall clock: the benchmark compares)
        "locked_at": locked_at,
        "built_ms": built_ms,
        **result.timings,
    }
    if watcher is not None:
        watcher.note_apply(result)
    _note_attempt(up_to_id=up_to_id, error="")
    _settle(up_to_id=up_to_id, result=result)
    probe_error = "" if result.probe is None or result.probe.ok else f"probe failed: {result.probe.error}"
    _record_state(state=state, result=result, error=probe_error, drift=drift)
    return result


# --- reconcile -----------------------------------------------------------------------------------------------


def _apply_through_hook(
    adapter: HookBrokerAdapter, *, up_to_id: int | None, state: BrokerState, entered_at: float
) -> ApplyResult:
    """A broker that asks the console (the HTTP hook) already answers every new question from the changed desired
    state: applying is ending the live sessions of the changed identities (they keep the rights they were granted),
    then the canary. The rows settle as for the files; an unreachable broker leaves them pending, retried."""
    client_ids = list(
        EnforcementChange.objects.filter(
            id__lte=up_to_id or 0, state__in=[EnforcementChange.State.PENDING, EnforcementChange.State.FAILED]
        )
        .exclude(client_id="")
        .values_list("client_id", flat=True)
        .distinct()
    )
    invalidated_at = time.monotonic()
    try:
        decision_cache.invalidate_changes(client_ids)
    except decision_cache.CacheUnavailable as exc:
        # The hook falls back to the database meanwhile; the sessions are still ended now, and the rows stay
        # pending until the invalidation got through (a stale answer must never outlive its change).
        cache_error = str(exc)
    else:
        cache_error = ""
    invalidated_ms = round((time.monotonic() - invalidated_at) * 1000, 1)
    try:
        result = adapter.apply(client_ids)
    except BrokerUnavailable as exc:
        _note_attempt(up_to_id=up_to_id, error=str(exc))
        _record_state(state=state, error=str(exc), reachable=False)
        raise
    if cache_error:
        _note_attempt(up_to_id=up_to_id, error=cache_error)
        _record_state(state=state, error=cache_error, reachable=True)
        raise BrokerUnavailable(cache_error)
    result.timings = {"path": "hook", "entered_at": entered_at, "invalidate_ms": invalidated_ms, **result.timings}
    _note_attempt(up_to_id=up_to_id, error="")
    _settle(up_to_id=up_to_id, result=result)
    probe_error = "" if result.probe is None or result.probe.ok else f"probe failed: {result.probe.error}"
    _record_state(state=state, result=result, error=probe_error)
    return result


def broker_drift(*, policy: RenderedPolicy | None = None) -> dict:
    """Compare the desired files with what is on disk (what the broker loads). Empty dict = in sync."""
    from .brokers.render import diff_text, redact_passwd

    policy = policy or policy_desired()
    loaded = get_adapter().loaded_files()
    drift: dict = {}
    if loaded.config != policy.config:
        drift["config"] = diff_text("mosquitto.conf", loaded.config, policy.config)
    if loaded.acl != policy.acl:
        drift["acl"] = diff_text("acl", loaded.acl, policy.acl)
    if loaded.passwd != policy.passwd:
        users = passwd_drift(loaded.passwd, policy.passwd)
        # The probe's password changes with every generation: by itself that is a pending apply, not drift.
        users["changed"] = [u for u in users["changed"] if u != settings.MQTT_PROBE_USERNAME]
        users = {k: v for k, v in users.items() if v}
        if users:
            drift["passwd"] = users
            drift["passwd_diff"] = diff_text("passwd", redact_passwd(loaded.passwd or ""), redact_passwd(policy.passwd))
        elif not loaded.passwd:
            drift["passwd"] = {"missing_file": True}
    return drift


def broker_reconcile(*, trigger: str = "schedule") -> dict:
    """Compare desired, on-disk and loaded; rewrite and reload on drift; probe; record what was found.

    "Loaded" is checked by the probe: its password is derived from the policy's generation, so if it logs in, the
    broker has loaded exactly the desired files. A restart (new pid or start time) is noticed and recorded."""
    if isinstance(get_adapter(), HookBrokerAdapter):
        # Nothing is loaded that could drift: the hook answers from the database. What can be left over is a change
        # whose kick did not reach the broker: apply the pending rows, and the canary proves the cluster asks.
        outcome = {"trigger": trigger, "drift": {}, "repaired": False}
        with broker_lock():
            try:
                result = _apply_locked(force_reload=False)
            except BrokerUnavailable as exc:
                outcome["error"] = str(exc)
                return outcome
        outcome["probe"] = result.probe.as_dict() if result.probe else None
        return outcome
    with broker_lock():
        state = BrokerState.load()
        policy = policy_desired()
        drift = broker_drift(policy=policy)
        process = get_adapter().process()
        if (
            process is not None
            and state.broker_pid
            and (process.pid != state.broker_pid or process.started != state.broker_started)
        ):
            drift["restart"] = {"previous_pid": state.broker_pid, "pid": process.pid}
        unknown = drift.get("passwd", {}).get("unknown", [])
        outcome = {"trigger": trigger, "drift": drift, "repaired": False}
        try:
            result = _apply_locked(force_reload=bool(drift), drift=drift)
        except BrokerUnavailable as exc:
            outcome["error"] = str(exc)
            return outcome
        outcome.update(repaired=bool(drift) and bool(result.probe and result.probe.ok), probe=result.probe.as_dict())
        file_drift = {k: v for k, v in drift.items() if k != "restart"}
        for username in unknown[:MAX_ALERTED_UNKNOWN]:
            audit_record(
                actor=None,
                action="broker.unknown_credential",
                object_type="broker",
                object_id=username,
                after={"username": username, "removed": True, "trigger": trigger},
            )
            from security.detection.alerts import alert_raise

            alert_raise(
                kind="unknown_credential",
                subject=username,
                client_id=username,
                device=Device.objects.filter(client_id=username).first(),
                summary=f"The broker had a credential for {username!r} that the console did not issue (removed)",
                evidence={"username": username, "removed": True, "trigger": trigger, "counts": {"found": 1}},
            )
        if file_drift or "restart" in drift:
            audit_record(
                actor=None,
                action="broker.drift_repaired" if file_drift else "broker.restart_seen",
                object_type="broker",
                object_id="mosquitto",
                after={
                    "trigger": trigger,
                    "drift": {k: v for k, v in drift.items() if not k.endswith("_diff")},
                    "unknown_credentials": len(unknown),
                    "probe_ok": bool(result.probe and result.probe.ok),
                },
            )
        return outcome


# --- read side for the policy page, API and the overview card ------------------------------------------------


def enforcement_summary() -> dict:
    """ "in sync" / "N changes pending" / "drift found", in a fixed number of queries."""
    from django.db.models import Count

    counts = dict(
        EnforcementChange.objects.filter(state__in=[EnforcementChange.State.PENDING, EnforcementChange.State.FAILED])
        .order_by()
        .values_list("state")
        .annotate(n=Count("id"))
    )
    state = BrokerState.objects.filter(pk=1).first()
    pending = counts.get(EnforcementChange.State.PENDING, 0)
    failed = counts.get(EnforcementChange.State.FAILED, 0)
    if failed or (state is not None and state.last_probe_ok is False):
        label = "drift found"
    elif pending:
        label = f"{pending} change{'s' if pending != 1 else ''} pending"
    elif state is None or state.last_checked is None:
        label = "never synced"
    else:
        label = "in sync"
    return {"label": label, "pending": pending, "failed": failed, "state": state}
