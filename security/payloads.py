"""Payload keys on the console side: issue (shown once), require, retire, keep encrypted at rest, load in bulk.

The envelope itself is fleetkeeper_device/sealing.py, the one implementation shared with the devices. A key is
32 random bytes; the database holds it encrypted with AES-256-GCM under a key derived (HKDF-SHA256) from
PAYLOAD_KEYS_SECRET, with the client id and key id as associated data, so a ciphertext copied onto another row does
not decrypt. The operator sees the key once, as ``fkpk1.<base64url>``.
"""

from __future__ import annotations

import base64
import functools
import os
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from devices.models import Device
from fleetkeeper_device import sealing

from .audit import audit_record
from .models import PayloadKey
from .services import _authorise

READ_OVERLAP = timedelta(seconds=30)
PERMISSION = "devices.issue_credentials"  # a payload key is a device credential: operators and admins
_AT_REST_PREFIX = "v1:"


class PayloadKeyUnreadable(Exception):
    """A stored key does not decrypt: PAYLOAD_KEYS_SECRET changed, or the row was edited outside the console."""


@functools.lru_cache(maxsize=4)
def _at_rest_cipher(secret: str) -> AESGCM:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"fleetkeeper payload keys at rest v1").derive(
        secret.encode()
    )
    return AESGCM(key)


def _associated(client_id: str, key_id: str) -> bytes:
    return f"fleetkeeper payload key\x00{client_id}\x00{key_id}".encode()


def key_encrypt(raw: bytes, *, client_id: str, key_id: str) -> str:
    nonce = os.urandom(12)
    sealed = _at_rest_cipher(settings.PAYLOAD_KEYS_SECRET).encrypt(nonce, raw, _associated(client_id, key_id))
    return _AT_REST_PREFIX + base64.b64encode(nonce + sealed).decode()


def key_decrypt(stored: str, *, client_id: str, key_id: str) -> bytes:
    if not stored.startswith(_AT_REST_PREFIX):
        raise PayloadKeyUnreadable(f"payload key {key_id} of {client_id} is not in a known at-rest format")
    data = base64.b64decode(stored[len(_AT_REST_PREFIX) :])
    try:
        return _at_rest_cipher(settings.PAYLOAD_KEYS_SECRET).decrypt(
            data[:12], data[12:], _associated(client_id, key_id)
        )
    except InvalidTag:
        raise PayloadKeyUnreadable(
            f"payload key {key_id} of {client_id} does not decrypt: PAYLOAD_KEYS_SECRET is not the one it was "
            "stored with (restore it, or issue the device a new payload key)"
        ) from None


def required_effective(row: PayloadKey) -> bool:
    return settings.PAYLOAD_ENCRYPTION_REQUIRED if row.required is None else row.required


@dataclass(frozen=True)
class IssuedPayloadKey:
    device: Device
    row: PayloadKey
    key_text: str  # shown once; never stored in clear, never logged or audited
    replaced: str | None  # the key id it replaced

    @property
    def key_id(self) -> str:
        return self.row.key_id

    @property
    def required(self) -> bool:
        return required_effective(self.row)


def _active(device: Device) -> PayloadKey | None:
    return PayloadKey.objects.filter(device=device, state=PayloadKey.State.ACTIVE).first()


def payload_key_issue(*, actor, device: Device, required: bool | None = None) -> IssuedPayloadKey:
    """Issue (or re-issue) the device's payload key. Re-issuing retires the old key at once: messages still sealed
    with it are refused (payload_tampered, "wrong key") until the device has the new one."""
    _authorise(actor, PERMISSION)
    raw = sealing.generate_key()
    key_id = sealing.key_id(raw).hex()
    with transaction.atomic():
        device = Device.objects.select_for_update().get(pk=device.pk)
        if device.status in (Device.Status.REVOKED, Device.Status.DECOMMISSIONED):
            raise ValidationError(
                f"{device.client_id} is {device.get_status_display().lower()}: reinstate it before issuing a "
                "payload key."
            )
        old = _active(device)
        if old is not None:
            old.state, old.retired_at = PayloadKey.State.RETIRED, timezone.now()
            old.save(update_fields=["state", "retired_at", "updated"])
            if required is None:
                required = old.required  # a re-issue keeps the device's own setting
        row = PayloadKey.objects.create(
            device=device,
            client_id=device.client_id,
            key_id=key_id,
            encrypted_key=key_encrypt(raw, client_id=device.client_id, key_id=key_id),
            required=required,
            created_by=actor if getattr(actor, "is_authenticated", False) else None,
        )
        audit_record(
            actor=actor,
            action="payload_key.reissue" if old else "payload_key.issue",
            target=device,
            before={"key_id": old.key_id} if old else None,
            after={"key_id": key_id, "required": row.required, "required_effective": required_effective(row)},
        )
    return IssuedPayloadKey(device=device, row=row, key_text=sealing.encode_key(raw), replaced=old and old.key_id)


def payload_key_set_required(*, actor, device: Device, required: bool | None) -> PayloadKey:
    """Require sealed messages from this device (True), accept clear text too (False), or follow the fleet
    setting (None)."""
    _authorise(actor, PERMISSION)
    with transaction.atomic():
        row = PayloadKey.objects.select_for_update().filter(device=device, state=PayloadKey.State.ACTIVE).first()
        if row is None:
            raise ValidationError(f"{device.client_id} has no payload key: issue one first.")
        before = {"required": row.required}
        row.required = required
        row.save(update_fields=["required", "updated"])
        audit_record(
            actor=actor,
            action="payload_key.require",
            target=device,
            before=before,
            after={"required": required, "required_effective": required_effective(row)},
        )
    return row


def payload_key_retire(*, actor, device: Device) -> PayloadKey:
    """The device stops sealing: its key is retired; its sealed messages are refused from now on."""
    _authorise(actor, PERMISSION)
    with transaction.atomic():
        row = PayloadKey.objects.select_for_update().filter(device=device, state=PayloadKey.State.ACTIVE).first()
        if row is None:
            raise ValidationError(f"{device.client_id} has no active payload key.")
        row.state, row.retired_at = PayloadKey.State.RETIRED, timezone.now()
        row.save(update_fields=["state", "retired_at", "updated"])
        audit_record(actor=actor, action="payload_key.retire", target=device, before={"key_id": row.key_id})
    return row


def payload_seal_many(*, items: list[tuple[str, str, bytes]], chunk: int = 500) -> list[bytes | None]:
    """(client id, topic, plaintext) of many console-to-device messages -> each sealed with its device's active key,
    or None for a device without one (sent in clear). A batch (a rotation chunk of 1,000) costs one locked read and one
    counter update per ``chunk`` devices, not a transaction per message; each device's counters are reserved under the
    row lock, so two workers never use the same nonce. The commander calls this for everything it publishes."""
    out: list[bytes | None] = [None] * len(items)
    wanted: dict[str, int] = {}
    for client_id, _topic, _plaintext in items:
        wanted[client_id] = wanted.get(client_id, 0) + 1
    rows: dict[str, PayloadKey] = {}
    first: dict[str, int] = {}
    client_ids = sorted(wanted)
    with transaction.atomic():
        for i in range(0, len(client_ids), chunk):
            locked = list(
                PayloadKey.objects.select_for_update().filter(
                    client_id__in=client_ids[i : i + chunk], state=PayloadKey.State.ACTIVE
                )
            )
            for row in locked:
                first[row.client_id] = row.console_counter + 1
                row.console_counter += wanted[row.client_id]
                rows[row.client_id] = row
            PayloadKey.objects.bulk_update(locked, ["console_counter"])
    if not rows:
        return out
    keys = {
        client_id: sealing.PayloadKey(key_decrypt(row.encrypted_key, client_id=row.client_id, key_id=row.key_id))
        for client_id, row in rows.items()
    }
    for index, (client_id, topic, plaintext) in enumerate(items):
        if client_id not in rows:
            continue
        counter, first[client_id] = first[client_id], first[client_id] + 1
        out[index] = keys[client_id].seal(
            plaintext, topic=topic, client_id=client_id, counter=counter, direction=sealing.CONSOLE_TO_DEVICE
        )
    return out


def payload_seal_for_device(*, device: Device, topic: str, plaintext: bytes) -> bytes | None:
    """One message (``payload_seal_many`` with one item); None when the device has no active key."""
    return payload_seal_many(items=[(device.client_id, topic, plaintext)])[0]


@dataclass(frozen=True)
class LoadedKey:
    client_id: str
    key_id: str
    key: sealing.PayloadKey | None  # None: retired (the consumer forgets it)
    required: bool


def payload_keys_changed(*, since: datetime | None) -> tuple[list[LoadedKey], datetime | None]:
    """Every key changed at or after ``since`` (all active keys when None), decrypted, in one query; and the newest
    ``updated`` seen (the next call's ``since``). For the consumer's cache."""
    rows = PayloadKey.objects.only("client_id", "key_id", "encrypted_key", "state", "required", "updated")
    if since is not None:
        # Overlap: a row saved in a transaction that committed after a newer one was read has an older ``updated``.
        rows = rows.filter(updated__gte=since - READ_OVERLAP)
    else:
        rows = rows.filter(state=PayloadKey.State.ACTIVE)
    loaded, newest = [], since
    for row in rows.order_by("updated", "id").iterator(chunk_size=2000):
        newest = row.updated if newest is None or row.updated > newest else newest
        if row.state != PayloadKey.State.ACTIVE:
            loaded.append(LoadedKey(row.client_id, row.key_id, None, False))
            continue
        try:
            raw = key_decrypt(row.encrypted_key, client_id=row.client_id, key_id=row.key_id)
        except PayloadKeyUnreadable:
            continue  # logged by the caller's count; the device's sealed messages become "unknown key"
        loaded.append(LoadedKey(row.client_id, row.key_id, sealing.PayloadKey(raw), required_effective(row)))
    return loaded, newest


def payload_key_for(device: Device) -> PayloadKey | None:
    """The device's active key row (the device page's fragment)."""
    return _active(device)
