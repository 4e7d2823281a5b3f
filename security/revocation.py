"""Revocation and quarantine (issue 5): one device or a filtered bulk, enforced through the outbox, then *verified*.

The status change itself is ``security.services._device_status_change`` (status, credential deletion, audit, outbox
row). This module adds what a person on call needs around it:

* a required reason, the alert it answers, and a ``DeviceAction`` row that says "pending" until verified;
* the verifier (``device_action_verify_pending``), run by the apply task after every apply and by the reconcile
  job: it proves from the broker's side what the console asked for (docs/revocation.md says exactly what);
* bulk actions over a device-list filter: a preview count, a typed confirmation, a durable row worked through in
  chunks by a task, one outbox row (so at most one reload) per chunk.
"""

from __future__ import annotations

import logging
import secrets
from datetime import UTC

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from devices.filtersets import DeviceFilterSet
from devices.models import Device
from security.confirmation import typed_count_check

from . import services, topics
from .audit import actor_label, audit_context, audit_record, current_context
from .brokers import get_adapter
from .brokers.base import BrokerUnavailable, files_digest_bytes
from .brokers.hook_adapter import HookBrokerAdapter
from .brokers.mqtt_client import connect_code
from .brokers.render import probe_generation_password
from .brokers.sessions import SessionWatcher, connect_code_from
from .models import BulkAction, DeviceAction, DeviceCredential, EnforcementChange
from .revocation_sessions import purge_enqueue, session_watch_take

logger = logging.getLogger(__name__)

MAX_REASON_LENGTH = 2000
BULK_CHUNK_SIZE = 100  # devices per transaction and per outbox row: 500 devices -> at most 5 reloads
BULK_MAX_DEVICES = 200_000
VERIFY_CONNECT_BUDGET = 200  # connect attempts per verification run (each costs the broker one CONNECT)
BULK_ACTIONS = ("revoke", "quarantine")
# Filter names a bulk action accepts: the device list's, without sorting and paging.
BULK_FILTERS = tuple(name for name in DeviceFilterSet.base_filters if name != "ordering")


def _reason_clean(reason: str | None) -> str:
    reason = (reason or "").strip()
    if not reason:
        raise ValidationError({"reason": ["Say why (it goes into the audit log and onto the device page)."]})
    if len(reason) > MAX_REASON_LENGTH:
        raise ValidationError({"reason": [f"Keep the reason under {MAX_REASON_LENGTH} characters."]})
    return reason


def _supersede(client_ids) -> None:
    DeviceAction.objects.filter(
        client_id__in=list(client_ids), state__in=[DeviceAction.State.PENDING, DeviceAction.State.FAILED]
    ).update(state=DeviceAction.State.SUPERSEDED)


# --- one device -------------------------------------------------------------------------------------------------


def device_action_request(
    *, actor, device: Device, action: str, reason: str, alert_id: int | None = None
) -> DeviceAction:
    """Revoke, quarantine or reinstate one device with a reason. Returns the pending DeviceAction; the apply task
    puts the policy on the broker and the verifier marks the action verified."""
    if action not in ("revoke", "quarantine", "reinstate"):
        raise ValidationError(f"Unknown action {action!r}.")
    reason = _reason_clean(reason)
    context = current_context()
    with transaction.atomic():
        device = services._device_status_change(actor=actor, device=device, action=action, reason=reason)
        change = EnforcementChange.objects.filter(client_id=device.client_id, kind=f"device.{action}").latest("id")
        _supersede([device.client_id])
        record = DeviceAction.objects.create(
            device=device,
            client_id=device.client_id,
            action=action,
            reason=reason,
            alert_id=alert_id,
            change=change,
            requested_by=actor if getattr(actor, "is_authenticated", False) else None,
            requested_by_label=actor_label(actor),
            source_address=context.source_address,
            request_id=context.request_id,
        )
    return record


def device_action_latest(*, client_id: str) -> DeviceAction | None:
    return DeviceAction.objects.filter(client_id=client_id).select_related("change").order_by("-id").first()


# --- verification -------------------------------------------------------------------------------------------------


def _acl_blocks(acl: str) -> dict[str, list[str]]:
    """username -> the lines of its ``user`` block in the ACL file."""
    blocks: dict[str, list[str]] = {}
    current = None
    for line in acl.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("user "):
            current = line[5:].strip()
            blocks.setdefault(current, [])
        elif current is not None and line.startswith("topic "):
            blocks[current].append(line)
    return blocks


def loaded_generation(*, config: str, passwd: str, acl: str) -> str:
    """The generation of the files on disk, computed like ``policy_render`` does (the probe's own line removed)."""
    import hashlib

    probe = settings.MQTT_PROBE_USERNAME
    base = "".join(line + "\n" for line in passwd.splitlines() if line.partition(":")[0] != probe)
    return hashlib.sha256("\0".join([config, acl, base]).encode()).hexdigest()[:24]


def loaded_generation_bytes(*, config: bytes, passwd: bytes, acl: bytes) -> tuple[str, str]:
    """(generation, files digest) of the loaded files, computed like the renderer: one hashing pass when the probe's
    line is the last line, as rendered (any other layout: every line filtered, and hashed twice)."""
    import hashlib

    probe = settings.MQTT_PROBE_USERNAME.encode() + b":"
    last = passwd.rfind(b"\n", 0, len(passwd) - 1) + 1
    if passwd[last:].startswith(probe) and not passwd.startswith(probe) and b"\n" + probe not in passwd[:last]:
        hasher = hashlib.sha256(config)
        for part in (b"\0", acl, b"\0", memoryview(passwd)[:last]):
            hasher.update(part)
        generation = hasher.copy().hexdigest()[:24]
        hasher.update(memoryview(passwd)[last:])
        return generation, hasher.hexdigest()
    base = b"".join(line + b"\n" for line in passwd.splitlines() if not line.startswith(probe))
    hasher = hashlib.sha256(config)
    for part in (b"\0", acl, b"\0", base):
        hasher.update(part)
    return hasher.hexdigest()[:24], files_digest_bytes(config=config, passwd=passwd, acl=acl)


def _has_line(passwd: bytes, username: str) -> bool:
    needle = username.encode() + b":"
    return passwd.startswith(needle) or (b"\n" + needle) in passwd


def _quarantine_denies(client_id: str) -> set[str]:
    tx, rx = settings.MQTT_TOPIC_TX_PREFIX, settings.MQTT_TOPIC_RX_PREFIX
    return {f"topic deny {tx}/{client_id}/{c}" for c in topics.QUARANTINE_DENIED_TX} | {
        f"topic deny {rx}/{client_id}/{c}" for c in topics.QUARANTINE_DENIED_RX
    }


def _now_ms() -> str:
    return timezone.now().astimezone(UTC).isoformat(timespec="milliseconds")


def device_action_verify_pending(*, limit: int = 5000) -> dict:
    """Verify every pending action whose outbox row has been applied, against what the broker has *loaded*.

    1. the files on disk are hashed into their generation; the canary logs in with that generation's password:
       success proves the running broker has loaded exactly these files (docs/broker.md, "Probe");
    2. revoke: the loaded password file has no line for the username, and a CONNECT as the username (with a random
       password, the console keeps no secret) is refused; quarantine: the loaded ACL denies exactly the channels
       the device loses; reinstate: no deny block is left.
    Runs under the broker lock so no apply changes the files between the checks."""
    rows = list(
        DeviceAction.objects.filter(
            state__in=[DeviceAction.State.PENDING, DeviceAction.State.FAILED],
            change__state=EnforcementChange.State.APPLIED,
        ).order_by("id")[:limit]
    )
    if not rows:
        return {"verified": 0, "failed": 0, "waiting": 0}
    adapter = get_adapter()
    if isinstance(adapter, HookBrokerAdapter):
        return _verify_through_hook(rows, adapter=adapter)
    watcher = session_watch_take()
    try:
        with services.broker_lock():
            return _verify_locked(rows, adapter=adapter, watcher=watcher)
    finally:
        if watcher is not None:
            watcher.close()


def _verify_locked(rows: list[DeviceAction], *, adapter, watcher: SessionWatcher | None) -> dict:
    cfg = adapter.cfg
    loaded = adapter.loaded_bytes()
    if not loaded.complete():
        _note_waiting(rows, "the broker's files are missing; the reconcile job rewrites them")
        return {"verified": 0, "failed": 0, "waiting": len(rows)}
    generation, digest = loaded_generation_bytes(config=loaded.config, passwd=loaded.passwd, acl=loaded.acl)
    probe_code, probe_address = connect_code_from(
        cfg.host,
        cfg.port,
        username=settings.MQTT_PROBE_USERNAME,
        password=probe_generation_password(settings.MQTT_PROBE_PASSWORD, generation),
        timeout=settings.MQTT_PROBE_TIMEOUT,
    )
    if probe_code != 0:
        _note_waiting(rows, f"the broker has not loaded the files on disk yet (canary refused, code {probe_code})")
        return {"verified": 0, "failed": 0, "waiting": len(rows)}
    # This login came after the reload: once the watcher has seen it in the broker's log, it has seen every
    # session that reload dropped (one subscription delivers the log in order).
    marker_seen = bool(watcher and probe_address and watcher.wait_for_connection_from(probe_address))
    passwd = loaded.passwd
    blocks = _acl_blocks(loaded.acl.decode())
    budget = VERIFY_CONNECT_BUDGET
    verified = failed = 0
    purge_wanted = False
    for row in rows:
        evidence = {
            "checked_at": _now_ms(),
            "broker": f"{cfg.host}:{cfg.port}",
            "policy_digest": digest,
            "generation": generation,
            "generation_loaded": True,
            "in_password_file": _has_line(passwd, row.client_id),
        }
        denies = set(blocks.get(row.client_id, []))
        if row.action == DeviceAction.Action.REVOKE:
            ok = not evidence["in_password_file"]
            attempt = None
            if budget > 0:
                budget -= 1
                code = connect_code(
                    cfg.host,
                    cfg.port,
                    username=row.client_id,
                    password=secrets.token_urlsafe(24),
                    timeout=settings.MQTT_PROBE_TIMEOUT,
                )
                attempt = {"username": row.client_id, "password": "random, never issued", "code": code}
                attempt["refused"] = code != 0
                ok = ok and code != 0
            evidence["connect_attempt"] = attempt
            # The broker's own word on the live session (not a condition of "verified": the refusal is).
            evidence["session"] = (
                watcher.session_evidence(row.client_id, marker_seen=marker_seen)
                if watcher is not None
                else {
                    "observed": False,
                    "state": "not_observed",
                    "why": "no session watcher was subscribed to the broker's log at the reload that loaded it "
                    "(verified by a later run, e.g. the reconcile job)",
                }
            )
            if ok and settings.REVOCATION_PURGE_SESSIONS:
                evidence["purge"] = {"state": "pending", "attempts": 0}
                purge_wanted = True
        elif row.action == DeviceAction.Action.QUARANTINE:
            expected = _quarantine_denies(row.client_id)
            evidence["acl_denies"] = sorted(denies & expected)
            evidence["repair_path_kept"] = not any(
                f"/{row.client_id}/{c}" in line
                for line in denies
                for c in (*topics.REPAIR_RX_CHANNELS, *topics.REPAIR_TX_CHANNELS)
            )
            ok = expected <= denies and evidence["repair_path_kept"]
        else:
            evidence["acl_denies"] = sorted(denies)
            has_credential = DeviceCredential.objects.filter(device_id=row.device_id).exists()
            evidence["needs_new_secret"] = not has_credential
            ok = not denies and (evidence["in_password_file"] or not has_credential)
        _settle_row(row, ok=ok, evidence=evidence)
        verified += ok
        failed += not ok
    if purge_wanted:
        purge_enqueue()
    return {"verified": verified, "failed": failed, "waiting": 0}


def _verify_through_hook(rows: list[DeviceAction], *, adapter: HookBrokerAdapter) -> dict:
    """A broker that asks the console: the adapter checks what it answers now (a revoked identity is refused
    through the broker and has no live session), and a verified revocation's queued messages are purged at once."""
    verified = failed = 0
    for row in rows:
        ok, evidence = adapter.verify_action(action=row.action, client_id=row.client_id)
        evidence["checked_at"] = _now_ms()
        if ok and row.action == DeviceAction.Action.REVOKE and settings.REVOCATION_PURGE_SESSIONS:
            try:
                evidence["purge"] = {"state": "done", "queues": adapter.purge([row.client_id])[row.client_id]}
            except BrokerUnavailable as exc:
                evidence["purge"] = {"state": "failed", "error": str(exc)}
        _settle_row(row, ok=ok, evidence=evidence)
        verified += ok
        failed += not ok
    return {"verified": verified, "failed": failed, "waiting": 0}


def _note_waiting(rows: list[DeviceAction], error: str) -> None:
    from django.db.models import F

    DeviceAction.objects.filter(pk__in=[r.pk for r in rows]).update(attempts=F("attempts") + 1, last_error=error)


def _settle_row(row: DeviceAction, *, ok: bool, evidence: dict) -> None:
    with transaction.atomic():
        # A later action may have superseded this one meanwhile: leave it alone.
        updated = DeviceAction.objects.filter(
            pk=row.pk, state__in=[DeviceAction.State.PENDING, DeviceAction.State.FAILED]
        ).update(
            state=DeviceAction.State.VERIFIED if ok else DeviceAction.State.FAILED,
            verified_at=timezone.now() if ok else None,
            evidence=evidence,
            attempts=row.attempts + 1,
            last_error="" if ok else "the broker's loaded policy does not enforce this action",
        )
        if not updated or (not ok and row.state == DeviceAction.State.FAILED):
            return  # superseded, or a failure already recorded (the reconcile retries every minute)
        audit_record(
            actor=None,
            action=f"device.{row.action}_{'verified' if ok else 'verification_failed'}",
            object_type="device",
            object_id=row.client_id,
            after={"action_id": row.pk, "bulk_id": row.bulk_id, **evidence},
        )


def verify_after_apply(*, service: str = "revocation-verifier") -> dict:
    """For the tasks: never let a verification problem fail an apply (it is retried by the reconcile job)."""
    try:
        with audit_context(service=service):
            return device_action_verify_pending()
    except Exception:
        logger.exception("verifying pending revocations failed; the reconcile job retries")
        return {"error": True}


# --- bulk ------------------------------------------------------------------------------------------------------


def bulk_filters_clean(filters) -> dict:
    """The device-list filters a bulk action will use. Refuses unknown names and invalid values: django-filter
    silently ignores both, which here would widen the set of devices revoked."""
    if hasattr(filters, "lists"):  # a QueryDict: keep lists for multi-valued filters
        raw = {k: (v if k == "status" else v[-1]) for k, v in filters.lists()}
    else:
        raw = dict(filters or {})
    raw = {k: v for k, v in raw.items() if k not in ("page", "ordering", "page_size") and v not in ("", [], None)}
    unknown = sorted(set(raw) - set(BULK_FILTERS))
    if unknown:
        raise ValidationError(
            {"filters": [f"Unknown filter(s): {', '.join(unknown)}. Use: {', '.join(BULK_FILTERS)}."]}
        )
    for key, value in raw.items():
        if key == "status":
            value = [value] if isinstance(value, str) else value
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValidationError({"filters": ["status is a list of statuses."]})
            raw[key] = value
        elif not isinstance(value, str):
            raise ValidationError({"filters": [f"{key} must be a string."]})
    filterset = DeviceFilterSet(raw, queryset=Device.objects.all())
    if not filterset.is_valid():
        messages = [f"{field}: {' '.join(errs)}" for field, errs in filterset.errors.items()]
        raise ValidationError({"filters": messages})
    return raw


def bulk_queryset(filters: dict):
    return DeviceFilterSet(filters, queryset=Device.objects.all()).qs.order_by().distinct()


def bulk_preview(*, action: str, filters: dict) -> dict:
    """How many devices the filter matches and how many of them the action would change."""
    allowed_from = services._TRANSITIONS[action][0]
    qs = bulk_queryset(filters)
    matched = qs.count()
    eligible = qs.filter(status__in=allowed_from).count()
    sample = list(qs.filter(status__in=allowed_from).order_by("client_id").values_list("client_id", flat=True)[:10])
    return {"matched": matched, "eligible": eligible, "unchanged": matched - eligible, "sample": sample}


def bulk_action_create(*, actor, action: str, filters, reason: str, confirm_count) -> BulkAction:
    """Fix the set of devices when the person confirms: they typed the number of devices the preview showed; if
    the filter matches a different number now, nothing happens and they are told the new number."""
    if action not in BULK_ACTIONS:
        raise ValidationError({"action": [f"Bulk actions are {', '.join(BULK_ACTIONS)}."]})
    services._authorise(actor, services._TRANSITIONS[action][2])
    filters = bulk_filters_clean(filters)
    reason = _reason_clean(reason)
    allowed_from = services._TRANSITIONS[action][0]
    context = current_context()
    with transaction.atomic():
        ids = list(bulk_queryset(filters).filter(status__in=allowed_from).order_by("pk").values_list("pk", flat=True))
        if not ids:
            raise ValidationError({"filters": ["No device matching these filters can be changed by this action."]})
        if len(ids) > BULK_MAX_DEVICES:
            raise ValidationError({"filters": [f"At most {BULK_MAX_DEVICES} devices per bulk action."]})
        typed_count_check(typed=confirm_count, matched=len(ids), can=f"can be {action}d now")
        bulk = BulkAction.objects.create(
            action=action,
            filters=filters,
            reason=reason,
            device_ids=ids,
            total=len(ids),
            created_by=actor if getattr(actor, "is_authenticated", False) else None,
            created_by_label=actor_label(actor),
            source_address=context.source_address,
            request_id=context.request_id,
        )
        audit_record(
            actor=actor,
            action=f"bulk.{action}_requested",
            object_type="bulkaction",
            object_id=str(bulk.pk),
            after={"filters": filters, "devices": len(ids), "reason": reason},
        )
        transaction.on_commit(lambda: _enqueue_bulk(bulk.pk))
    return bulk


def _enqueue_bulk(bulk_id: int) -> None:
    from .tasks import run_bulk_action

    try:
        run_bulk_action.delay(bulk_id)
    except Exception:  # the row is durable: the reconcile job resumes it
        logger.exception("could not enqueue bulk action %s; the reconcile job resumes it", bulk_id)


def bulk_action_run_chunk(*, bulk_id: int, chunk_size: int = BULK_CHUNK_SIZE) -> bool:
    """Work through the next chunk in one transaction: statuses, credentials, one audit event and one DeviceAction
    per device, and ONE outbox row for the chunk. Returns True while there is more to do. Idempotent: a chunk whose
    transaction did not commit is simply done again, and devices already changed are skipped."""
    with transaction.atomic():
        bulk = BulkAction.objects.select_for_update().filter(pk=bulk_id).first()
        if bulk is None or bulk.done:
            return False
        allowed_from, target, _permission = services._TRANSITIONS[bulk.action]
        ids = bulk.device_ids[bulk.processed : bulk.processed + chunk_size]
        actor = bulk.created_by
        with audit_context(service="bulk-action", source_address=bulk.source_address, request_id=bulk.request_id):
            devices = list(Device.objects.select_for_update().filter(pk__in=ids).only("id", "client_id", "status"))
            eligible = [d for d in devices if d.status in allowed_from]
            now = timezone.now()
            if eligible:
                pks = [d.pk for d in eligible]
                Device.objects.filter(pk__in=pks).update(status=target, updated=now)
                removed = set()
                if target == Device.Status.REVOKED:
                    removed = set(
                        DeviceCredential.objects.filter(device_id__in=pks).values_list("device_id", flat=True)
                    )
                    DeviceCredential.objects.filter(device_id__in=pks).delete()
                for device in eligible:
                    audit_record(
                        actor=actor or bulk.created_by_label,
                        action=f"device.{bulk.action}",
                        object_type="device",
                        object_id=device.client_id,
                        before={"status": device.status},
                        after={
                            "status": target,
                            "reason": bulk.reason,
                            "bulk_id": bulk.pk,
                            "credential_removed": device.pk in removed,
                        },
                    )
                _supersede(d.client_id for d in eligible)
                change = services.enforcement_enqueue(
                    kind=f"bulk.{bulk.action}",
                    summary=f"bulk #{bulk.pk}: {len(eligible)} device{'s' if len(eligible) != 1 else ''}",
                    actor=actor,
                )
                DeviceAction.objects.bulk_create(
                    [
                        DeviceAction(
                            device_id=d.pk,
                            client_id=d.client_id,
                            action=bulk.action,
                            reason=bulk.reason,
                            bulk=bulk,
                            change=change,
                            requested_by=actor,
                            requested_by_label=bulk.created_by_label,
                            source_address=bulk.source_address,
                            request_id=bulk.request_id,
                        )
                        for d in eligible
                    ]
                )
            missing = len(ids) - len(devices)
            bulk.processed += len(ids)
            bulk.changed += len(eligible)
            bulk.skipped += len(devices) - len(eligible) + missing
            if missing and len(bulk.errors) < 100:
                bulk.errors.append({"reason": f"{missing} device(s) were deleted before their turn"})
            bulk.state = BulkAction.State.RUNNING
            more = bulk.processed < bulk.total
            if not more:
                bulk.state = BulkAction.State.SUCCEEDED
                bulk.finished = now
                audit_record(
                    actor=actor or bulk.created_by_label,
                    action=f"bulk.{bulk.action}_completed",
                    object_type="bulkaction",
                    object_id=str(bulk.pk),
                    after={"changed": bulk.changed, "skipped": bulk.skipped, "total": bulk.total},
                )
            bulk.save()
    return more


def bulk_action_resume_stalled(*, older_than_seconds: int = 120) -> int:
    """For the reconcile job: a bulk action whose task was lost (Redis flushed, worker gone) is picked up again."""
    from datetime import timedelta

    cutoff = timezone.now() - timedelta(seconds=older_than_seconds)
    stalled = list(
        BulkAction.objects.filter(
            state__in=[BulkAction.State.PENDING, BulkAction.State.RUNNING], updated__lt=cutoff
        ).values_list("pk", flat=True)
    )
    for bulk_id in stalled:
        _enqueue_bulk(bulk_id)
    return len(stalled)


def bulk_action_session_counts(bulk: BulkAction) -> dict:
    """For a bulk revocation's page: what the broker said about the live sessions, and how far the purge is."""
    from django.db.models import Count
    from django.db.models.fields.json import KT

    rows = (
        DeviceAction.objects.filter(bulk=bulk, action=DeviceAction.Action.REVOKE)
        .order_by()
        .annotate(session=KT("evidence__session__state"), purge=KT("evidence__purge__state"))
        .values_list("session", "purge")
        .annotate(n=Count("id"))
    )
    counts = {"dropped": 0, "not_connected": 0, "not_observed": 0, "purged": 0, "purge_pending": 0, "purge_failed": 0}
    for session, purge, n in rows:
        if session in ("dropped", "not_connected", "not_observed"):
            counts[session] += n
        key = {"done": "purged", "pending": "purge_pending", "failed": "purge_failed"}.get(purge)
        if key:
            counts[key] += n
    return counts


def bulk_action_counts(bulk: BulkAction) -> dict:
    """Verification progress of a bulk action (for its page and the API), in one query."""
    from django.db.models import Count

    by_state = dict(DeviceAction.objects.filter(bulk=bulk).order_by().values_list("state").annotate(n=Count("id")))
    return {state: by_state.get(state, 0) for state in DeviceAction.State.values}


# --- the fast path for revocations ----------------------------------------------------------------------------------


def policy_fast_revoke(*, up_to_id: int | None, state, adapter):
    """The desired policy for "the last applied policy minus these revoked devices", built from the files the broker
    loads instead of a full render (at 100,000 devices the render is ~0.45 s of a revocation's ~0.8 s).

    Only when it is provably the same as a full render, else None (the caller renders in full):
    * every pending outbox row is a ``device.revoke``, and each of those devices is revoked with no credential;
    * the files on disk are byte for byte what the last successful apply wrote (their digest is BrokerState's), so
      nothing else changed since;
    * none of them was quarantined or has a certificate (an ACL block, a CRL: those render in full).
    Removing lines keeps the sorted order of a full render, so the result is identical (tested). Each file is read
    once as bytes, and only the new probe line is validated before the write (``DerivedPolicy``)."""
    if up_to_id is None or not state.applied_digest:
        return None
    rows = list(
        EnforcementChange.objects.filter(
            id__lte=up_to_id, state__in=[EnforcementChange.State.PENDING, EnforcementChange.State.FAILED]
        ).values_list("kind", "client_id")[:1001]
    )
    if not rows or len(rows) > 1000 or any(kind != "device.revoke" for kind, _ in rows):
        return None
    usernames = {client_id for _, client_id in rows}
    if Device.objects.filter(
        client_id__in=usernames, status=Device.Status.REVOKED, credential__isnull=True
    ).count() != len(usernames):
        return None
    # A device with a certificate: the full render adds its deny block and the CRL (the PKI work, docs/pki.md).
    from . import models as security_models

    DeviceCertificate = getattr(security_models, "DeviceCertificate", None)  # noqa: N806
    if DeviceCertificate is not None and DeviceCertificate.objects.filter(client_id__in=usernames).exists():
        return None
    return adapter.policy_without(
        usernames, applied_digest=state.applied_digest, probe_secret=settings.MQTT_PROBE_PASSWORD
    )
