"""Steps 1-3 of the secret handover (docs/rotation.md): deliver the new secret through the commander identity,
confirm it from the device's ack (handed over by the consumer through the inbox), and switch the broker to it in
rate-limited batches (one outbox row, one reload per batch)."""

from __future__ import annotations

import logging
import secrets
from collections import defaultdict
from datetime import timedelta

import redis
from django.conf import settings
from django.db import transaction
from django.db.models import F, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from fleetkeeper_device import protocol
from security import topics
from security.audit import audit_context, audit_record_many
from security.enforcement.secrets import hash_secret
from security.models import (
    CredentialRotation,
    DeviceCredential,
)
from security.services import SECRET_BYTES, enforcement_enqueue

from . import commander
from .rows import (
    CHUNK,
    ROTATABLE_STATUSES,
    SWITCH_BUDGET_KEY,
    State,
    _alert,
    _append,
    _bulk_step,
    _chunks,
    _enqueue,
    _step,
    _update_per_row,
    command_id_for,
)

log = logging.getLogger(__name__)

# --- deliver -------------------------------------------------------------------------------------------------------


def credentials_message(*, command_id: str, secret: str, rotation_id: int, now: float) -> bytes:
    """The `credentials` message of docs/device-protocol.md, validated by the device library's own schema."""
    return protocol.encode(
        "credentials",
        id=command_id,
        ts=round(now, 3),
        expires=round(now + settings.ROTATION_MESSAGE_TTL_SECONDS, 3),
        secret=secret,
        credential_id=f"rot-{rotation_id}",
    )


def rotation_deliver(*, rotation_ids: list[int], resend: bool = False) -> dict:
    """Send the new secret to each device (secret rotations) or ask for a CSR (certificate rotations, H3's module).

    First delivery takes rows still pending; ``resend`` also takes delivered rows (the device came back, or never
    confirmed). Each send makes a fresh secret and command id, written (hash only) before anything is published, so
    an ack can never arrive for a secret the database does not know. Idempotent under redelivery of the task: a row
    already confirmed (or further) is never touched, and the worst case of a crash is one more fresh secret."""
    states = [State.PENDING, State.DELIVERED] if resend else [State.PENDING]
    outcome = {"published": 0, "failed": 0, "skipped": 0, "certificate": 0, "sealed": 0}
    ids = list(rotation_ids)
    certificate_ids = list(
        CredentialRotation.objects.filter(pk__in=ids, state__in=states, kind=CredentialRotation.Kind.CERTIFICATE)
        .order_by()
        .values_list("id", flat=True)
    )
    if certificate_ids:
        from . import certificates
        from .commander import CommanderUnavailable

        # One commander connection for the whole chunk, as for secrets.
        sent_certificates = certificates.certificate_renew_deliver_many(rotation_ids=certificate_ids)
        outcome["certificate"] += sent_certificates["sent"]
        if sent_certificates["failed"]:
            raise CommanderUnavailable(f"{sent_certificates['failed']} certificate renewals were not acknowledged")
    messages: list[tuple[str, bytes]] = []
    sent: list[tuple[int, str]] = []  # (rotation id, command id) per message
    now = timezone.now()
    with transaction.atomic():
        rows = list(
            CredentialRotation.objects.select_for_update(of=("self",))
            .filter(pk__in=ids, state__in=states, kind=CredentialRotation.Kind.SECRET)
            .order_by("pk")
            .values("id", "client_id", "attempts", "device_id", "device__status", "device__last_seen")
        )
        cancelled = [r["id"] for r in rows if r["device_id"] is None or r["device__status"] not in ROTATABLE_STATUSES]
        if cancelled:
            _bulk_step(
                cancelled,
                _step("deliver", "cancelled", "the device left the fleet", at=now),
                state=State.CANCELLED,
                pending_hash="",
            )
        per_row: list[tuple[str, str, int]] = []
        by_attempt: dict[tuple[int, bool], list[int]] = defaultdict(list)
        # A device not seen for ROTATION_RESEND_SECONDS is probably offline: when it is seen again, it gets the
        # message again at once (the tick), instead of waiting out the blind re-send's backoff.
        away_before = now - timedelta(seconds=settings.ROTATION_RESEND_SECONDS)
        skip = set(cancelled)
        for row in rows:
            if row["id"] in skip:
                continue
            # The plaintext lives only in the message below, which is published and dropped.
            secret = secrets.token_urlsafe(SECRET_BYTES)
            attempt = row["attempts"] + 1
            command_id = command_id_for(row["id"], attempt)
            pending_hash = hash_secret(secret, iterations=settings.MQTT_PASSWORD_ITERATIONS)
            messages.append(
                (
                    topics.rx_topic(row["client_id"], topics.RX_CREDENTIALS),
                    credentials_message(
                        command_id=command_id, secret=secret, rotation_id=row["id"], now=now.timestamp()
                    ),
                )
            )
            per_row.append((command_id, pending_hash, row["id"]))
            away = row["device__last_seen"] is None or row["device__last_seen"] < away_before
            by_attempt[(attempt, away)].append(row["id"])
            sent.append((row["id"], command_id))
        _update_per_row(CredentialRotation, ["command_id", "pending_hash"], per_row)
        for (attempt, away), attempt_ids in by_attempt.items():
            entry = _step("deliver", "sending", at=now, attempt=attempt)
            if away:
                entry["device_away"] = True
            _bulk_step(attempt_ids, entry, attempts=attempt, last_error="")
        outcome["skipped"] = len(ids) - len(rows) - len(certificate_ids)
    if not messages:
        return outcome
    # Step 1 of the handover, "encrypted to the device's payload key": the commander seals what it publishes to a
    # device that has one.
    try:
        result = commander.publish(messages)
    except commander.CommanderUnavailable as exc:
        _delivery_failed(sent, str(exc))
        raise
    acked = [rid for (rid, _), ok in zip(sent, result.acknowledged, strict=True) if ok]
    failed = [(rid, cid) for (rid, cid), ok in zip(sent, result.acknowledged, strict=True) if not ok]
    delivered_at = timezone.now()
    for chunk in _chunks(acked, CHUNK):
        # Only rows still waiting: an ack may already have confirmed one of them.
        CredentialRotation.objects.filter(pk__in=chunk, state=State.PENDING).update(
            state=State.DELIVERED, delivered_at=delivered_at, updated=delivered_at
        )
        CredentialRotation.objects.filter(pk__in=chunk, state=State.DELIVERED).update(
            delivered_at=delivered_at, updated=delivered_at
        )
    if failed:
        errors = {sent[i][0]: err for i, err in result.errors.items()}
        for rid, cid in failed:
            _delivery_failed([(rid, cid)], errors.get(rid) or "the broker did not acknowledge the message in time")
    outcome["published"], outcome["failed"], outcome["sealed"] = len(acked), len(failed), result.sealed
    return outcome


def _delivery_failed(sent: list[tuple[int, str]], error: str) -> None:
    """Record the failed attempt on rows that still carry the command id we tried (never on a newer one)."""
    for rid, command_id in sent:
        with transaction.atomic():
            row = (
                CredentialRotation.objects.select_for_update()
                .filter(pk=rid, command_id=command_id, state__in=[State.PENDING, State.DELIVERED])
                .first()
            )
            if row is None:
                continue
            row.last_error = error[:2000]
            row.history = _append(row.history, _step("deliver", "failed", error))
            row.save(update_fields=["last_error", "history", "updated"])


# --- confirm (acks from tx/<id>/ack, handed over by the consumer through the inbox) ---------------------------------


def rotations_confirm(*, acks: list[tuple[str, str, str, str]]) -> dict:
    """(client_id, command_id, status, detail) of many acks at once, in one transaction: ok -> confirmed and the
    switch is enqueued; rejected/failed/expired -> recorded (expired: re-sent; rejected/failed: the rotation fails and
    an alert is raised). Unknown, stale (a superseded command id) and duplicate acks are counted and ignored."""
    counts = {"confirmed": 0, "refused": 0, "expired": 0, "stale": 0}
    if not acks:
        return counts
    by_command = {command_id: (client_id, status, detail) for client_id, command_id, status, detail in acks}
    confirmed: list[tuple[int, str]] = []  # (id, client id)
    refused_ids: list[int] = []
    resend_ids: list[int] = []
    with transaction.atomic():
        rows = []
        for chunk in _chunks(list(by_command), CHUNK):
            rows += list(
                CredentialRotation.objects.select_for_update()
                .filter(command_id__in=chunk, state__in=[State.PENDING, State.DELIVERED])
                .values("id", "client_id", "command_id")
            )
        # Read the clock once the rows are locked: a delivery recorded while this waited for them has its time
        # before the confirmation's (a confirmed_at earlier than delivered_at was seen in CI).
        now = timezone.now()
        for row in rows:
            client_id, status, detail = by_command[row["command_id"]]
            if client_id != row["client_id"]:  # an ack for another device's command id: never
                continue
            if status == "ok":
                confirmed.append((row["id"], row["client_id"]))
            elif status == "expired":
                resend_ids.append(row["id"])
            else:
                refused_ids.append(row["id"])
        _bulk_step(
            [pk for pk, _ in confirmed],
            _step("confirm", at=now),
            state=State.CONFIRMED,
            confirmed_at=now,
            delivered_at=Coalesce(F("delivered_at"), Value(now)),
        )
        if resend_ids:
            _bulk_step(resend_ids, _step("confirm", "expired", "the message arrived after its expiry; sent again"))
        refused = list(CredentialRotation.objects.filter(pk__in=refused_ids).select_related("device"))
        for row in refused:
            _client_id, status, detail = by_command[row.command_id]
            row.state, row.failed_at, row.pending_hash = State.FAILED, now, ""
            row.last_error = f"the device answered {status}: {detail}"[:2000]
            row.history = _append(row.history, _step("confirm", status, detail, at=now))
            row.save(update_fields=["state", "failed_at", "pending_hash", "last_error", "history", "updated"])
        with audit_context(service="rotation"):
            audit_record_many(
                actor=None,
                action="rotation.confirm",
                items=[(client_id, {"rotation": pk, "status": "confirmed"}) for pk, client_id in confirmed],
            )
            for row in refused:
                _alert(
                    kind="rotation_rejected",
                    row=row,
                    summary=f"{row.client_id} refused its new secret ({row.last_error[:120]}); it keeps the old one",
                )
        confirmed_ids = [pk for pk, _ in confirmed]
        from .tasks import rotation_deliver_resend, rotation_switch

        for ids in _chunks(confirmed_ids, settings.ROTATION_DELIVER_CHUNK):
            _enqueue(rotation_switch, ids)
        if resend_ids:
            _enqueue(rotation_deliver_resend, resend_ids)
    counts.update(
        confirmed=len(confirmed_ids),
        refused=len(refused),
        expired=len(resend_ids),
        stale=len(acks) - len(confirmed_ids) - len(refused) - len(resend_ids),
    )
    if counts["stale"]:
        log.info("rotation: %d acks for unknown or superseded command ids ignored", counts["stale"])
    return counts


def rotation_confirm(*, client_id: str, command_id: str, status: str, detail: str = "") -> CredentialRotation | None:
    """One ack. Returns the rotation it confirmed (or failed), None for an unknown or stale command id."""
    counts = rotations_confirm(acks=[(client_id, command_id, status, detail)])
    if counts["stale"]:
        return None
    return CredentialRotation.objects.filter(command_id=command_id, client_id=client_id).first()


# --- switch ----------------------------------------------------------------------------------------------------------


def _switch_budget(counts_by_policy: dict[int | None, int], limits: dict[int | None, int]) -> dict[int | None, int]:
    """How many switches each policy may make now: a fixed one-minute window per policy in Redis, shared by every
    worker. Without Redis there is no worker either, so nothing is limited."""
    allowed: dict[int | None, int] = {}
    try:
        client = redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=2)
        minute = int(timezone.now().timestamp() // 60)
        for policy_id, wanted in counts_by_policy.items():
            limit = limits.get(policy_id, 0)
            if limit <= 0:
                allowed[policy_id] = wanted
                continue
            key = f"{SWITCH_BUDGET_KEY}:{policy_id or 'none'}:{minute}"
            pipe = client.pipeline()
            pipe.incrby(key, wanted)
            pipe.expire(key, 120)
            used = pipe.execute()[0]
            grant = max(0, min(wanted, limit - (used - wanted)))
            if grant < wanted:
                client.decrby(key, wanted - grant)
            allowed[policy_id] = grant
    except redis.ConnectionError:
        return dict(counts_by_policy)
    return allowed


def rotation_switch(*, rotation_ids: list[int]) -> dict:
    """Move confirmed secrets into the broker: DeviceCredential.password_hash := pending_hash, one outbox row for the
    whole batch (one reload re-authenticates every connected client: each rotated device is dropped and reconnects
    with its new secret, which is the proof). Limited per policy to switches_per_minute; the rest is deferred
    (returned, and re-enqueued by the task with a countdown)."""
    now = timezone.now()
    result = {"switched": 0, "cancelled": 0, "deferred": [], "change": None}
    with transaction.atomic():
        rows = list(
            CredentialRotation.objects.select_for_update(of=("self",))
            .filter(pk__in=list(rotation_ids), state=State.CONFIRMED, kind=CredentialRotation.Kind.SECRET)
            .order_by("pk")
            .values(
                "id",
                "client_id",
                "device_id",
                "device__status",
                "policy_id",
                "policy__switches_per_minute",
                "pending_hash",
            )
        )
        if not rows:
            return result
        wanted: dict[int | None, int] = defaultdict(int)
        limits: dict[int | None, int] = {}
        for row in rows:
            wanted[row["policy_id"]] += 1
            limits[row["policy_id"]] = row["policy__switches_per_minute"] or 0
        budget = _switch_budget(dict(wanted), limits)
        with_credential = set()
        for chunk in _chunks([r["device_id"] for r in rows if r["device_id"]], CHUNK):
            with_credential |= set(
                DeviceCredential.objects.filter(device_id__in=chunk).values_list("device_id", flat=True)
            )
        switched, cancelled = [], []
        for row in rows:
            if row["device_id"] not in with_credential or row["device__status"] not in ROTATABLE_STATUSES:
                cancelled.append(row["id"])
            elif budget.get(row["policy_id"], 0) <= 0:
                result["deferred"].append(row["id"])
            else:
                budget[row["policy_id"]] -= 1
                switched.append(row)
        if cancelled:
            _bulk_step(
                cancelled,
                _step("switch", "cancelled", "the device lost its credential", at=now),
                state=State.CANCELLED,
                pending_hash="",
            )
        change = None
        if switched:
            _update_per_row(
                DeviceCredential,
                ["password_hash"],
                [(r["pending_hash"], r["device_id"]) for r in switched],
                key="device_id",
            )
            device_ids = [r["device_id"] for r in switched]
            for chunk in _chunks(device_ids, CHUNK):
                DeviceCredential.objects.filter(device_id__in=chunk).update(
                    issued_at=now, issued_by=None, source=DeviceCredential.Source.GENERATED
                )
            change = enforcement_enqueue(
                kind="credential.rotate",
                client_id=switched[0]["client_id"] if len(switched) == 1 else "",
                summary=f"{len(switched)} rotated secret{'s' if len(switched) != 1 else ''} replace the old ones",
            )
            _bulk_step(
                [r["id"] for r in switched],
                _step("switch", at=now, change=change.pk),
                state=State.SWITCHED,
                pending_hash="",
                switched_at=now,
            )
        with audit_context(service="rotation"):
            audit_record_many(
                actor=None,
                action="credential.rotate",
                items=[(r["client_id"], {"rotation": r["id"], "change": change.pk}) for r in switched],
            )
    result.update(switched=len(switched), cancelled=len(cancelled), change=change.pk if change else None)
    return result


def seconds_to_next_minute() -> float:
    """When the per-policy switch budget (a one-minute window) renews."""
    now = timezone.now().timestamp()
    return 60 - now % 60 + 0.5
