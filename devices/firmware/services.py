"""Firmware registry services: the signing key, releases (digest computed and signed here), withdraw / mark
known-vulnerable, and offers to devices (a durable row per device, published through the commander identity, answered
by the device's ack through the consumer's inbox). Every change is audited; every entry point checks the role."""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import tempfile
import time
from collections.abc import Iterable
from datetime import timedelta
from typing import IO

from django.conf import settings
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.urls import reverse
from django.utils import timezone

from devices.models import Device, DeviceModel, FirmwareOffer, FirmwareRelease, FirmwareSigningKey
from fleetkeeper_device import protocol
from security import topics
from security.audit import audit_record, audit_record_many, current_context
from security.permissions import user_can

from . import signing, versions

log = logging.getLogger(__name__)

CHUNK = 500
OFFERABLE_STATUSES = (Device.Status.ACTIVE, Device.Status.QUARANTINED)  # quarantine keeps the firmware channel
State = FirmwareOffer.State
OPEN_STATES = (State.PENDING, State.DELIVERED)  # an offer still waiting for the device's answer


def _authorise(actor, permission: str) -> None:
    """A user needs the right; a service (no user) must say who it is (audit_context)."""
    if actor is None:
        if current_context().service:
            return
        raise PermissionDenied("No actor: call this as a user, or inside audit_context(service=...) as a service.")
    if not user_can(actor, permission):
        raise PermissionDenied(f"Your role does not allow this ({permission}).")


def _label(actor) -> str:
    if getattr(actor, "is_authenticated", False):
        return actor.get_username()[:150]
    service = current_context().service
    return f"service:{service}" if service else "system"


def _user(actor):
    return actor if getattr(actor, "is_authenticated", False) else None


def release_fields(release: FirmwareRelease) -> dict:
    return {
        "model": release.model.name,
        "version": release.version,
        "sha256": release.sha256,
        "size": release.size,
        "key_id": release.key.key_id,
        "minimum_secure": release.minimum_secure,
        "vulnerable": release.vulnerable,
        "withdrawn": release.withdrawn,
    }


# --- the signing key ------------------------------------------------------------------------------------------------


def firmware_signing_key_create(*, actor) -> FirmwareSigningKey:
    """A new Ed25519 key becomes the active one; the previous key is retired (its releases keep their signatures).
    Devices verify with the public key they were built with: a new key means new firmware carrying it (signed with
    the old key) before offers signed with the new one are accepted. docs/firmware.md, "Rotating the key"."""
    _authorise(actor, "devices.add_firmwaresigningkey")
    key_id, public_pem, encrypted = signing.generate()
    now = timezone.now()
    with transaction.atomic():
        retired = list(
            FirmwareSigningKey.objects.select_for_update().filter(active=True).values_list("key_id", flat=True)
        )
        FirmwareSigningKey.objects.filter(active=True).update(active=False, retired_at=now)
        key = FirmwareSigningKey.objects.create(
            key_id=key_id, public_key_pem=public_pem, private_key_encrypted=encrypted, created_by_label=_label(actor)
        )
        audit_record(
            actor=actor,
            action="firmware_key.create",
            target=key,
            object_id=key.key_id,
            before={"active": retired[0]} if retired else None,
            after={"key_id": key.key_id, "active": True},
        )
    return key


def firmware_signing_key_active(*, actor=None) -> FirmwareSigningKey:
    """The active key; the first release creates one (audited) when none exists yet."""
    key = FirmwareSigningKey.objects.filter(active=True).first()
    if key is not None:
        return key
    from security.audit import audit_context

    with audit_context(service="firmware-registry"):
        try:
            return firmware_signing_key_create(actor=None)
        except IntegrityError:  # another request created it at the same moment
            return FirmwareSigningKey.objects.get(active=True)


# --- releases -------------------------------------------------------------------------------------------------------


def _store_image(image: IO[bytes]) -> tuple[str, int, str]:
    """Stream the upload to FIRMWARE_STORAGE_DIR, hashing as it goes. (stored name, size, sha256)."""
    directory = settings.FIRMWARE_STORAGE_DIR
    directory.mkdir(parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    limit = settings.FIRMWARE_MAX_IMAGE_BYTES
    handle, tmp = tempfile.mkstemp(dir=directory, prefix=".upload-")
    try:
        with os.fdopen(handle, "wb") as out:
            while chunk := image.read(1024 * 1024):
                size += len(chunk)
                if size > limit:
                    raise ValidationError(
                        {"image": f"The image is larger than FIRMWARE_MAX_IMAGE_BYTES ({limit} bytes)."}
                    )
                digest.update(chunk)
                out.write(chunk)
        if size == 0:
            raise ValidationError({"image": "The image is empty."})
        name = f"{digest.hexdigest()}.bin"
        os.replace(tmp, directory / name)  # content-addressed: the same image twice is one file
        return name, size, digest.hexdigest()
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def firmware_release_create(
    *,
    actor,
    model: DeviceModel,
    version: str,
    image: IO[bytes] | None = None,
    url: str = "",
    sha256: str = "",
    size: int | None = None,
    notes: str = "",
    minimum_secure: bool = False,
) -> FirmwareRelease:
    """Register and sign a release. Either ``image`` (the console stores it, computes size and SHA-256) or ``url`` with
    the ``sha256`` and ``size`` the firmware team computed (the console signs that digest as given)."""
    _authorise(actor, "devices.add_firmwarerelease")
    try:
        version = versions.validate(version)
    except versions.InvalidVersion as exc:
        raise ValidationError({"version": str(exc)}) from None
    version_sort = versions.sort_key(version)
    if FirmwareRelease.objects.filter(model=model, version_sort=version_sort).exists():
        raise ValidationError(
            {"version": f"{model.name} already has release {version} (or an equal version); use a new version."}
        )
    if (image is None) == (not url):
        raise ValidationError({"image": "Give either an image to upload or the URL of an image hosted elsewhere."})
    stored_name = ""
    if image is not None:
        stored_name, size, sha256 = _store_image(image)
    else:
        sha256 = (sha256 or "").strip().lower()
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValidationError({"sha256": "Give the image's SHA-256 as 64 hexadecimal characters."})
        if size is None or size <= 0:
            raise ValidationError({"size": "Give the image's size in bytes (a positive number)."})
    key = firmware_signing_key_active(actor=actor)
    release = FirmwareRelease(
        model=model,
        version=version,
        version_sort=version_sort,
        stored_name=stored_name,
        url=url,
        size=size,
        sha256=sha256,
        signature=signing.sign(key.private_key_encrypted, sha256),
        key=key,
        notes=notes,
        released_by=_user(actor),
        released_by_label=_label(actor),
        minimum_secure=minimum_secure,
    )
    release.full_clean(exclude=["version_sort"])
    with transaction.atomic():
        try:
            with transaction.atomic():
                release.save()
        except IntegrityError:
            raise ValidationError({"version": f"{model.name} already has release {version}."}) from None
        device_model_firmware_sync(model=model)
        audit_record(actor=actor, action="firmware.release", target=release, after=release_fields(release))
        _check_model_after_commit(model.pk)
    return release


def firmware_release_withdraw(*, actor, release: FirmwareRelease, reason: str) -> FirmwareRelease:
    """Pulled: no longer offered nor counted as the latest; devices running it are alerted; unsent offers cancelled."""
    _authorise(actor, "devices.withdraw_firmware")
    reason = (reason or "").strip()
    if not reason:
        raise ValidationError({"reason": "Say why the release is withdrawn (shown to operators and in the alerts)."})
    with transaction.atomic():
        release = FirmwareRelease.objects.select_for_update().select_related("model", "key").get(pk=release.pk)
        if release.withdrawn:
            raise ValidationError({"release": f"{release} was already withdrawn on {release.withdrawn_at:%Y-%m-%d}."})
        before = release_fields(release)
        release.withdrawn, release.withdrawn_reason, release.withdrawn_at = True, reason, timezone.now()
        release.save(update_fields=["withdrawn", "withdrawn_reason", "withdrawn_at"])
        cancelled = FirmwareOffer.objects.filter(release=release, state=State.PENDING).update(
            state=State.CANCELLED, last_error="the release was withdrawn before it was sent", updated=timezone.now()
        )
        device_model_firmware_sync(model=release.model)
        audit_record(
            actor=actor,
            action="firmware.withdraw",
            target=release,
            before=before,
            after={**release_fields(release), "reason": reason, "offers_cancelled": cancelled},
        )
        _check_model_after_commit(release.model_id)
    return release


def firmware_release_mark_vulnerable(*, actor, release: FirmwareRelease, advisory: str) -> FirmwareRelease:
    """Known-vulnerable: every device running it gets a critical alert; it can no longer be offered."""
    _authorise(actor, "devices.flag_firmware")
    advisory = (advisory or "").strip()
    if not advisory:
        raise ValidationError({"advisory": "Give the advisory (CVE, what is affected, what to install instead)."})
    with transaction.atomic():
        release = FirmwareRelease.objects.select_for_update().select_related("model", "key").get(pk=release.pk)
        before = release_fields(release)
        release.vulnerable, release.advisory = True, advisory
        release.vulnerable_at = release.vulnerable_at or timezone.now()
        release.save(update_fields=["vulnerable", "advisory", "vulnerable_at"])
        device_model_firmware_sync(model=release.model)
        audit_record(
            actor=actor,
            action="firmware.mark_vulnerable",
            target=release,
            before=before,
            after={**release_fields(release), "advisory": advisory},
        )
        _check_model_after_commit(release.model_id)
    return release


def device_model_firmware_sync(*, model: DeviceModel) -> None:
    """Derive the model's latest / minimum firmware and its per-version flags from the registry (detection reads
    them from the model row). A model without releases keeps what the operator typed; minimum_firmware stays the
    operator's value until a release is flagged minimum-secure."""
    releases = list(
        FirmwareRelease.objects.filter(model=model).values(
            "version", "version_sort", "minimum_secure", "vulnerable", "advisory", "withdrawn"
        )
    )
    if not releases:
        return
    releases.sort(key=lambda r: versions.parse(r["version"]))
    current = [r for r in releases if not r["withdrawn"]]
    minimum = [r for r in releases if r["minimum_secure"]]
    model.latest_firmware = current[-1]["version"] if current else ""
    if minimum:
        model.minimum_firmware = minimum[-1]["version"]
    model.firmware_flags = {
        r["version_sort"]: {
            "version": r["version"],
            "vulnerable": r["vulnerable"],
            "advisory": r["advisory"][:500],
            "withdrawn": r["withdrawn"],
        }
        for r in releases
        if r["vulnerable"] or r["withdrawn"]
    }
    DeviceModel.objects.filter(pk=model.pk).update(
        latest_firmware=model.latest_firmware,
        minimum_firmware=model.minimum_firmware,
        firmware_flags=model.firmware_flags,
    )


def _check_model_after_commit(model_id: int) -> None:
    """Devices already running a version the registry now judges differently get their alert without waiting for
    their next status message."""

    def send():
        from . import tasks

        try:
            tasks.firmware_model_check.delay(model_id)
        except Exception:
            log.exception(
                "could not enqueue the firmware check of model %s; status messages still raise alerts", model_id
            )

    transaction.on_commit(send)


# --- offers ---------------------------------------------------------------------------------------------------------


def image_url(release: FirmwareRelease) -> str:
    if release.url:
        return release.url
    base = settings.FIRMWARE_DOWNLOAD_BASE_URL
    if not base:
        raise ValidationError(
            "FIRMWARE_DOWNLOAD_BASE_URL is not set: devices cannot download images stored in the console. Set it to "
            "the console's address as devices see it, or register the release with the URL of an image hosted "
            "elsewhere."
        )
    return base + reverse("firmware-image", args=[release.sha256])


def offer_refusal(release: FirmwareRelease) -> str:
    """Why this release cannot be offered ('' when it can)."""
    if release.withdrawn:
        return f"{release} was withdrawn ({release.withdrawn_reason[:200]}); offer another release."
    if release.vulnerable:
        return f"{release} is marked known-vulnerable; offer a fixed release."
    return ""


def firmware_offer(
    *, actor, release: FirmwareRelease, devices: Iterable[Device] | None = None, device_ids=None
) -> dict:
    """Offer ``release`` to devices (a queryset, a list, or ``device_ids``). Devices of another model, revoked or
    decommissioned ones are skipped and counted. One durable row per device, published after commit in chunks.
    Returns {"offered": [offer ids], "skipped": {reason: count}}."""
    _authorise(actor, "devices.offer_firmware")
    release = FirmwareRelease.objects.select_related("model", "key").get(pk=release.pk)  # flags as they are now
    refusal = offer_refusal(release)
    if refusal:
        raise ValidationError(refusal)
    url = image_url(release)  # refuse now, not at delivery, when devices could not download it
    if device_ids is None:
        device_ids = [d.pk for d in devices or []]
    device_ids = list(dict.fromkeys(device_ids))
    rows = list(Device.objects.filter(pk__in=device_ids).values("id", "client_id", "model_id", "status"))
    # An offer on its way (queued, or delivered and waiting for the answer) is not sent twice. One whose delivery
    # failed (the broker was unreachable past the task's retries), or delivered and unanswered past its expiry, is
    # replaced by the new one.
    now = timezone.now()
    lapsed = Q(state=State.PENDING, last_error__gt="") | Q(
        state=State.DELIVERED, delivered_at__lt=now - timedelta(seconds=settings.FIRMWARE_OFFER_TTL_SECONDS)
    )
    open_offers = set(
        FirmwareOffer.objects.filter(release=release, device_id__in=device_ids, state__in=OPEN_STATES)
        .exclude(lapsed)
        .values_list("device_id", flat=True)
    )
    skipped: dict[str, int] = {}
    eligible = []
    for row in rows:
        if row["id"] in open_offers:
            skipped["already offered"] = skipped.get("already offered", 0) + 1
        elif row["model_id"] != release.model_id:
            skipped["another model"] = skipped.get("another model", 0) + 1
        elif row["status"] not in OFFERABLE_STATUSES:
            skipped[row["status"]] = skipped.get(row["status"], 0) + 1
        else:
            eligible.append(row)
    if len(rows) < len(device_ids):
        skipped["unknown device"] = len(device_ids) - len(rows)
    label, user = _label(actor), _user(actor)
    with transaction.atomic():
        FirmwareOffer.objects.filter(lapsed, release=release, device_id__in=[r["id"] for r in eligible]).update(
            state=State.CANCELLED, detail="replaced by a new offer of the same release", updated=now
        )
        offers = FirmwareOffer.objects.bulk_create(
            [
                FirmwareOffer(
                    release=release,
                    device_id=row["id"],
                    client_id=row["client_id"],
                    command_id=f"fw{release.pk}-{secrets.token_hex(8)}",
                    url=url,
                    requested_by=user,
                    requested_by_label=label,
                )
                for row in eligible
            ],
            batch_size=CHUNK,
        )
        ids = (
            [o.pk for o in offers]
            if offers and offers[0].pk
            else list(
                FirmwareOffer.objects.filter(command_id__in=[o.command_id for o in offers]).values_list("id", flat=True)
            )
        )

        audit_record_many(
            actor=actor,
            action="firmware.offer",
            items=[
                (row["client_id"], {"release": release.pk, "version": release.version, "url": url}) for row in eligible
            ],
        )
        from . import tasks

        for i in range(0, len(ids), settings.ROTATION_DELIVER_CHUNK):
            chunk = ids[i : i + settings.ROTATION_DELIVER_CHUNK]
            transaction.on_commit(lambda chunk=chunk: _enqueue_deliver(tasks.firmware_offer_deliver, chunk))
    return {"offered": ids, "skipped": skipped}


def _enqueue_deliver(task, ids: list[int]) -> None:
    try:
        task.delay(ids)
    except Exception:
        log.exception("could not enqueue delivery of %d firmware offers; they stay pending (offer again)", len(ids))


def offer_message(offer: FirmwareOffer, *, now: float) -> bytes:
    release = offer.release
    return protocol.encode(
        "firmware_offer",
        id=offer.command_id,
        ts=round(now, 3),
        expires=round(now + settings.FIRMWARE_OFFER_TTL_SECONDS, 3),
        version=release.version,
        url=offer.url,
        size=release.size,
        sha256=release.sha256,
        signature=release.signature,
        key_id=release.key.key_id,
    )


def firmware_offer_deliver(*, offer_ids: list[int]) -> dict:
    """Publish pending offers through the commander identity (QoS 1, PUBACK awaited). Raises CommanderUnavailable
    (the task retries, bounded) when the broker cannot be reached; rows record every attempt."""
    from security.rotation import commander

    now = time.time()
    with transaction.atomic():
        offers = list(
            FirmwareOffer.objects.select_for_update(of=("self",))
            .filter(pk__in=offer_ids, state=State.PENDING)
            .select_related("release", "release__key")
            .order_by("pk")
        )
        for offer in offers:
            offer.attempts += 1
        FirmwareOffer.objects.bulk_update(offers, ["attempts"], batch_size=CHUNK)
    if not offers:
        return {"published": 0, "failed": 0}
    messages = [(topics.rx_topic(o.client_id, topics.RX_FIRMWARE), offer_message(o, now=now)) for o in offers]
    try:
        outcome = commander.publish(messages)
    except commander.CommanderUnavailable as exc:
        FirmwareOffer.objects.filter(pk__in=[o.pk for o in offers], state=State.PENDING).update(
            last_error=str(exc)[:2000], updated=timezone.now()
        )
        raise
    delivered_at = timezone.now()
    acked = [o.pk for o, ok in zip(offers, outcome.acknowledged, strict=True) if ok]
    # Only rows still pending: the device's ack may already have answered one.
    FirmwareOffer.objects.filter(pk__in=acked, state=State.PENDING).update(
        state=State.DELIVERED, delivered_at=delivered_at, last_error="", updated=delivered_at
    )
    failed = [(i, o) for i, (o, ok) in enumerate(zip(offers, outcome.acknowledged, strict=True)) if not ok]
    for i, offer in failed:
        FirmwareOffer.objects.filter(pk=offer.pk, state=State.PENDING).update(
            last_error=(outcome.errors.get(i) or "the broker did not acknowledge the message in time")[:2000],
            updated=delivered_at,
        )
    return {"published": len(acked), "failed": len(failed)}


ACK_STATES = {"ok": State.ACCEPTED, "rejected": State.REJECTED, "failed": State.FAILED, "expired": State.EXPIRED}


def firmware_offers_answered(*, acks: list[tuple[str, str, str, str]]) -> dict:
    """(client_id, command_id, status, detail) from the devices' acks (the consumer's inbox, one call per batch).
    An ack for an unknown id, another device's id or an offer already answered is ignored."""
    counts = {"answered": 0, "ignored": 0}
    if not acks:
        return counts
    by_command = {command_id: (client_id, status, detail) for client_id, command_id, status, detail in acks}
    now = timezone.now()
    with transaction.atomic():
        offers = list(
            FirmwareOffer.objects.select_for_update()
            .filter(command_id__in=list(by_command), state__in=[State.PENDING, State.DELIVERED])
            .select_related("release")
        )
        answered = []
        for offer in offers:
            client_id, status, detail = by_command[offer.command_id]
            if client_id != offer.client_id or status not in ACK_STATES:
                continue
            offer.state, offer.detail, offer.answered_at = ACK_STATES[status], (detail or "")[:2000], now
            offer.delivered_at, offer.updated = offer.delivered_at or now, now
            answered.append(offer)
        FirmwareOffer.objects.bulk_update(answered, ["state", "detail", "answered_at", "delivered_at", "updated"])
        from security.audit import audit_context

        with audit_context(service="firmware-registry"):
            audit_record_many(
                actor=None,
                action="firmware.offer_answer",
                items=[
                    (
                        o.client_id,
                        {"release": o.release_id, "version": o.release.version, "state": o.state, "detail": o.detail},
                    )
                    for o in answered
                ],
            )
    counts.update(answered=len(answered), ignored=len(acks) - len(answered))
    return counts
