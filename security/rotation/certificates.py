"""Certificate rotation (issue 7, "Certificates"): the console side of ``certificate_renew`` -> CSR -> ``certificate``.

A device that authenticates with a client certificate (an active DeviceCertificate, no DeviceCredential) rotates by
making a new key on the device (the private key never leaves it):

1. ``certificate_renew_deliver``: the delivery task sends ``certificate_renew`` on ``rx/<id>/credentials`` (the
   rotation's ``command_id`` is the message id); the device's current certificate is kept as ``old_certificate``.
2. ``csr_received``: the device answers on ``tx/<id>/csr`` with ``ref`` = that id. The CSR goes through the PKI's one
   signing path (``certificate_issue_from_csr``: signature, key type, CN = client id); the new certificate is stored
   (``new_certificate``) and sent as ``certificate`` (its message id becomes ``command_id``).
3. ``certificate_acked``: the device checks the certificate against its pending key, installs it and acks ``ok``:
   the rotation is *confirmed*. The old certificate stays valid for ``ROTATION_CERTIFICATE_GRACE_SECONDS``.
4. ``certificate_rotations_finish`` (periodic): once the grace has ended the old certificate is revoked through
   ``certificate_revoke`` (CRL, broker reload, the session still open with it taken over, so the device reconnects
   with the new one): *completed*.

Every step is written to the rotation's history and the audit log. Replies that match no open rotation (a stale ref,
a duplicate after the step was done) are ignored without side effects; a CSR for the wrong device fails the rotation.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from devices.models import Device
from fleetkeeper_device import protocol
from security import topics
from security.audit import audit_context, audit_record
from security.models import CredentialRotation, DeviceCertificate

logger = logging.getLogger(__name__)

SERVICE = "rotation-certificates"
CERTIFICATE_ID_SUFFIX = ".c"  # the `certificate` message's id: the renew id + this (deterministic, so a resend is
# the same message and the device's de-duplication answers it once)


def _history(rotation: CredentialRotation, step: str, outcome: str, detail: str = "") -> None:
    """The rotation core's history format (the device page shows it), bounded the same way."""
    from .rows import _append, _step

    rotation.history = _append(rotation.history, _step(step, outcome, detail))


def _publish_many(messages: list[tuple[str, bytes]]) -> list[bool]:
    """QoS 1 messages on rx/<id>/credentials through the console's command identity, one connection for all:
    per message, whether the broker acknowledged it. Raises CommanderUnavailable when it cannot be reached."""
    from security.rotation import commander

    outcome = commander.publish([(topics.rx_topic(cid, topics.RX_CREDENTIALS), payload) for cid, payload in messages])
    return list(outcome.acknowledged)


def _publish(client_id: str, payload: bytes) -> None:
    from security.rotation.commander import CommanderUnavailable

    if not _publish_many([(client_id, payload)])[0]:
        raise CommanderUnavailable(f"the broker did not acknowledge the message to {client_id}")


def active_certificate(device_id: int) -> DeviceCertificate | None:
    """The certificate a device authenticates with now: its newest active, unexpired one."""
    return (
        DeviceCertificate.objects.filter(
            device_id=device_id, status=DeviceCertificate.Status.ACTIVE, not_after__gt=timezone.now()
        )
        .order_by("-not_after", "-id")
        .first()
    )


def renew_message_id(rotation: CredentialRotation) -> str:
    """The id of the ``certificate_renew`` message (the id the device's CSR refers to)."""
    command_id = rotation.command_id
    return command_id[: -len(CERTIFICATE_ID_SUFFIX)] if command_id.endswith(CERTIFICATE_ID_SUFFIX) else command_id


def certificate_renew_deliver_many(*, rotation_ids: list[int]) -> dict:
    """Send ``certificate_renew`` to many devices: one transaction writes the rows, one commander connection
    publishes them all (as the secrets are delivered). First deliveries and re-sends alike; like the secret
    delivery, each row is written first (a fresh command id per renew, so a device whose de-duplication saw an
    earlier one answers again), then published, then marked delivered. When a CSR was already signed, what is
    missing is the device's ack of the certificate: the same ``certificate`` message is sent again (same id: a device
    that has it does not install it twice). Raises CommanderUnavailable when the broker cannot be reached."""
    from .rows import command_id_for

    prepared: list[tuple[CredentialRotation, bytes]] = []
    now = timezone.now()
    with transaction.atomic():
        rows = list(
            CredentialRotation.objects.select_for_update(of=("self",))  # PostgreSQL: not the outer join's side
            .select_related("new_certificate")
            .filter(
                pk__in=list(rotation_ids),
                kind=CredentialRotation.Kind.CERTIFICATE,
                state__in=[CredentialRotation.State.PENDING, CredentialRotation.State.DELIVERED],
            )
            .order_by("pk")
        )
        for row in rows:
            if row.old_certificate_id is None and row.device_id is not None:
                row.old_certificate = active_certificate(row.device_id)
            if row.new_certificate_id is not None:
                payload = _certificate_payload_for(row)
                _history(row, "deliver", "sending", f"certificate {row.new_certificate.serial[:16]} again")
            else:
                row.attempts += 1
                row.command_id = command_id_for(row.pk, row.attempts)
                payload = protocol.encode(
                    "certificate_renew",
                    id=row.command_id,
                    ts=round(now.timestamp(), 3),
                    expires=round(now.timestamp() + settings.ROTATION_MESSAGE_TTL_SECONDS, 3),
                    key_type=settings.ROTATION_CERTIFICATE_KEY_TYPE,
                )
                _history(row, "deliver", "sending", f"certificate_renew {row.command_id}, attempt {row.attempts}")
            row.last_error = ""
            row.updated = now
            prepared.append((row, payload))
        CredentialRotation.objects.bulk_update(
            rows, ["old_certificate", "attempts", "command_id", "history", "last_error", "updated"], batch_size=500
        )
    if not prepared:
        return {"sent": 0, "failed": 0}
    try:
        acknowledged = _publish_many([(row.client_id, payload) for row, payload in prepared])
    except Exception as exc:
        for row, _ in prepared:
            CredentialRotation.objects.filter(pk=row.pk, command_id=row.command_id).update(last_error=str(exc)[:2000])
        raise
    sent = [row.pk for (row, _), ok in zip(prepared, acknowledged, strict=True) if ok]
    for row, ok in zip((r for r, _ in prepared), acknowledged, strict=True):
        if not ok:
            CredentialRotation.objects.filter(pk=row.pk, command_id=row.command_id).update(
                last_error="the broker did not acknowledge the message in time"
            )
    delivered_at = timezone.now()
    for i in range(0, len(sent), 500):
        chunk = sent[i : i + 500]
        CredentialRotation.objects.filter(pk__in=chunk, state=CredentialRotation.State.PENDING).update(
            state=CredentialRotation.State.DELIVERED, delivered_at=delivered_at, updated=delivered_at
        )
        CredentialRotation.objects.filter(pk__in=chunk, state=CredentialRotation.State.DELIVERED).update(
            delivered_at=delivered_at, updated=delivered_at
        )
    return {"sent": len(sent), "failed": len(prepared) - len(sent)}


def certificate_renew_deliver(rotation: CredentialRotation) -> str:
    """One rotation (what the delivery task calls per certificate rotation); see certificate_renew_deliver_many."""
    from .commander import CommanderUnavailable

    outcome = certificate_renew_deliver_many(rotation_ids=[rotation.pk])
    rotation.refresh_from_db(fields=["command_id", "attempts", "old_certificate", "state", "delivered_at"])
    if outcome["failed"]:
        raise CommanderUnavailable(f"the broker did not acknowledge the message to {rotation.client_id}")
    return "sent" if outcome["sent"] else "skipped"


def _certificate_payload(*, rotation: CredentialRotation, certificate_pem: str, chain_pem: str) -> bytes:
    return protocol.encode(
        "certificate",
        id=renew_message_id(rotation) + CERTIFICATE_ID_SUFFIX,
        ts=round(timezone.now().timestamp(), 3),
        ref=renew_message_id(rotation),
        certificate=certificate_pem,
        chain=chain_pem or None,
    )


def _certificate_payload_for(rotation: CredentialRotation) -> bytes:
    from security.pki.services import ca_chain_pem

    return _certificate_payload(
        rotation=rotation, certificate_pem=rotation.new_certificate.certificate_pem, chain_pem=ca_chain_pem()
    )


def certificate_send(*, rotation_id: int) -> str:
    """Send the signed certificate of an open rotation (the task after ``csr_received``; kept out of the MQTT
    consumer, which must never wait on a publish)."""
    rotation = (
        CredentialRotation.objects.select_related("new_certificate")
        .filter(pk=rotation_id, state__in=CredentialRotation.OPEN_STATES, new_certificate__isnull=False)
        .first()
    )
    # pending too: the device can answer before the delivery task has recorded the delivery.
    if rotation is None or rotation.state not in (CredentialRotation.State.PENDING, CredentialRotation.State.DELIVERED):
        return "nothing to send"
    _publish(rotation.client_id, _certificate_payload_for(rotation))
    return "sent"


def _enqueue_send(rotation_id: int) -> None:
    from security.rotation.campaign_tasks import rotation_certificate_send

    try:
        rotation_certificate_send.delay(rotation_id)
    except Exception:  # durable: the delivery task's re-send sends the certificate again
        logger.exception("could not enqueue the certificate of rotation %s; the re-send delivers it", rotation_id)


def _open_certificate_rotation(client_id: str):
    return (
        CredentialRotation.objects.select_for_update()
        .filter(client_id=client_id, kind=CredentialRotation.Kind.CERTIFICATE, state__in=CredentialRotation.OPEN_STATES)
        .order_by("-id")
        .first()
    )


def _fail(rotation: CredentialRotation, *, step: str, detail: str) -> None:
    now = timezone.now()
    rotation.state = CredentialRotation.State.FAILED
    rotation.failed_at = now
    rotation.last_error = detail[:2000]
    _history(rotation, step, "failed", detail)
    rotation.save(update_fields=["state", "failed_at", "last_error", "history", "updated"])
    audit_record(
        actor=None,
        action="rotation.failed",
        object_type="device",
        object_id=rotation.client_id,
        after={"rotation_id": rotation.pk, "kind": rotation.kind, "step": step, "detail": detail[:500]},
    )


def csr_received(*, client_id: str, message: dict) -> str:
    """A ``csr`` message from tx/<id>/csr (already decoded and validated as protocol). Returns what was done, for
    the inbox's counters: signed, resent, ignored or failed."""
    from security.pki.services import certificate_issue_from_csr

    with audit_context(service=SERVICE), transaction.atomic():
        rotation = _open_certificate_rotation(client_id)
        if rotation is None or message.get("ref") != renew_message_id(rotation):
            logger.info("CSR from %s with ref %r matches no open certificate rotation", client_id, message.get("ref"))
            return "ignored"
        if rotation.new_certificate_id is not None:
            # The same CSR again (a QoS 1 redelivery, or our certificate was lost): send the same certificate.
            transaction.on_commit(lambda: _enqueue_send(rotation.pk))
            return "resent"
        device = Device.objects.filter(pk=rotation.device_id).first()
        if device is None:
            _fail(rotation, step="csr", detail="the device was deleted")
            return "failed"
        try:
            issued = certificate_issue_from_csr(actor=None, device=device, csr_pem=message.get("csr") or "")
        except ValidationError as exc:
            detail = "; ".join(exc.messages)
            _fail(rotation, step="csr", detail=f"the device's CSR was refused: {detail}")
            return "failed"
        rotation.new_certificate = issued.record
        rotation.command_id = renew_message_id(rotation) + CERTIFICATE_ID_SUFFIX
        _history(rotation, "csr", "signed", f"certificate {issued.record.serial[:16]} ({issued.record.key_type})")
        rotation.save(update_fields=["new_certificate", "command_id", "history", "updated"])
        audit_record(
            actor=None,
            action="rotation.certificate_signed",
            object_type="device",
            object_id=client_id,
            after={"rotation_id": rotation.pk, "serial": issued.record.serial, "ref": message.get("ref")},
        )
        transaction.on_commit(lambda: _enqueue_send(rotation.pk))
    return "signed"


def certificate_acked(*, client_id: str, message: dict) -> str:
    """An ack whose command is ``certificate_renew`` or ``certificate``. Returns what was done."""
    command, status, ack_id = message.get("command"), message.get("status"), message.get("id")
    detail = message.get("detail") or ""
    with audit_context(service=SERVICE), transaction.atomic():
        rotation = _open_certificate_rotation(client_id)
        if rotation is None:
            return "ignored"
        if command == "certificate_renew":
            if ack_id != renew_message_id(rotation):
                return "ignored"
            if status in ("ok", "expired"):  # expired: the re-send delivers a fresh renew
                _history(rotation, "renew_ack", status, detail)
                rotation.save(update_fields=["history", "updated"])
                return "noted"
            _fail(rotation, step="renew_ack", detail=f"the device answered {status}: {detail or 'no detail'}")
            return "failed"
        if command != "certificate" or ack_id != rotation.command_id or rotation.new_certificate_id is None:
            return "ignored"
        if rotation.state == CredentialRotation.State.CONFIRMED:
            return "ignored"  # a duplicate ack
        if status != "ok":
            new = rotation.new_certificate
            _fail(rotation, step="certificate_ack", detail=f"the device refused the certificate: {detail or status}")
            if new is not None and new.status == DeviceCertificate.Status.ACTIVE:
                from security.pki.services import certificate_revoke

                # Never installed: nobody holds its key but the device, and it said it will not use it.
                certificate_revoke(actor=None, certificate=new, reason=f"rotation #{rotation.pk}: refused by device")
            return "failed"
        now = timezone.now()
        rotation.state = CredentialRotation.State.CONFIRMED
        rotation.confirmed_at = now
        rotation.deadline = now + timedelta(seconds=settings.ROTATION_CERTIFICATE_GRACE_SECONDS)
        _history(
            rotation,
            "certificate_ack",
            "confirmed",
            f"installed serial {(message.get('result') or {}).get('serial', '?')}",
        )
        rotation.save(update_fields=["state", "confirmed_at", "deadline", "history", "updated"])
        audit_record(
            actor=None,
            action="rotation.confirm",
            object_type="device",
            object_id=client_id,
            after={
                "rotation_id": rotation.pk,
                "kind": "certificate",
                "new_serial": rotation.new_certificate.serial,
                "old_serial": rotation.old_certificate.serial if rotation.old_certificate_id else None,
                "old_revoked_after": rotation.deadline.isoformat(),
            },
        )
    return "confirmed"


def certificate_rotations_finish(*, now=None, limit: int = 500) -> int:
    """Periodic: confirmed certificate rotations whose grace has ended revoke the old certificate (CRL, reload,
    cut-off of a session still open with it) and complete. Returns how many completed."""
    from security.pki.services import certificate_revoke

    now = now or timezone.now()
    ids = list(
        CredentialRotation.objects.filter(
            kind=CredentialRotation.Kind.CERTIFICATE, state=CredentialRotation.State.CONFIRMED, deadline__lte=now
        )
        .order_by("deadline", "id")
        .values_list("pk", flat=True)[:limit]
    )
    done = 0
    for rotation_id in ids:
        with audit_context(service=SERVICE), transaction.atomic():
            rotation = (
                CredentialRotation.objects.select_for_update(of=("self",))  # PostgreSQL: not the outer join's side
                .select_related("old_certificate", "new_certificate")
                .filter(pk=rotation_id, state=CredentialRotation.State.CONFIRMED)
                .first()
            )
            if rotation is None:
                continue
            old = rotation.old_certificate
            if old is not None and old.status == DeviceCertificate.Status.ACTIVE:
                certificate_revoke(
                    actor=None,
                    certificate=old,
                    reason=f"superseded by rotation #{rotation.pk} (new serial {rotation.new_certificate.serial[:16]})",
                )
                _history(rotation, "revoke_old", "revoked", f"old certificate {old.serial[:16]} on the CRL")
            else:
                _history(rotation, "revoke_old", "skipped", "no active old certificate to revoke")
            rotation.state = CredentialRotation.State.COMPLETED
            rotation.completed_at = timezone.now()
            rotation.save(update_fields=["state", "completed_at", "history", "updated"])
            audit_record(
                actor=None,
                action="rotation.complete",
                object_type="device",
                object_id=rotation.client_id,
                after={"rotation_id": rotation.pk, "kind": "certificate", "old_serial": old.serial if old else None},
            )
            done += 1
    return done
