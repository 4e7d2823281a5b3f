"""Inventory services: every change to devices, models and groups goes through here, validated and audited."""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Iterable, Iterator
from datetime import timedelta

from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from security.audit import audit_record

from .models import Device, DeviceGroup, DeviceModel, ImportJob
from .validators import is_valid_client_id, normalize_mac

DEVICE_FIELDS = ("client_id", "name", "model", "groups", "serial", "mac", "status", "firmware_version")
EDITABLE_DEVICE_FIELDS = ("name", "model", "groups", "serial", "mac", "firmware_version")
logger = logging.getLogger(__name__)
CSV_COLUMNS = ["client_id", "name", "model", "groups", "serial", "mac", "firmware_version"]


def device_snapshot(device: Device) -> dict:
    """What the audit log keeps of a device: the fields an operator can see and change."""
    groups = sorted(g.name for g in device.groups.all()) if device.pk else []
    return {
        "client_id": device.client_id,
        "name": device.name,
        "model": device.model.name if device.model_id else None,
        "groups": groups,
        "serial": device.serial,
        "mac": device.mac,
        "status": device.status,
        "firmware_version": device.firmware_version,
    }


def _clean_mac(value: str | None) -> str:
    try:
        return normalize_mac(value or "")
    except ValidationError as exc:
        raise ValidationError({"mac": exc.messages}) from exc


@transaction.atomic
def device_create(
    *,
    actor,
    client_id: str,
    name: str = "",
    model: DeviceModel | None = None,
    groups: Iterable[DeviceGroup] = (),
    serial: str = "",
    mac: str = "",
    firmware_version: str = "",
) -> Device:
    device = Device(
        client_id=client_id,
        name=name,
        model=model,
        serial=serial,
        mac=_clean_mac(mac),
        firmware_version=firmware_version,
    )
    device.full_clean()
    device.save()
    device.groups.set(list(groups))
    audit_record(actor=actor, action="device.create", target=device, after=device_snapshot(device))
    return device


@transaction.atomic
def device_update(*, actor, device: Device, data: dict) -> Device:
    """Change the editable fields. Status is not among them: revoke, quarantine and reinstate are
    their own actions because each one changes what the broker enforces."""
    unknown = set(data) - set(EDITABLE_DEVICE_FIELDS)
    if unknown:
        raise ValidationError({field: "This field cannot be changed here." for field in sorted(unknown)})
    before = device_snapshot(device)
    for field, value in data.items():
        if field == "groups":
            continue
        if field == "mac":
            value = _clean_mac(value)
        setattr(device, field, value)
    device.full_clean()
    device.save()
    if "groups" in data:
        device.groups.set(list(data["groups"]))
    after = device_snapshot(device)
    if after != before:
        audit_record(actor=actor, action="device.update", target=device, before=before, after=after)
    return device


@transaction.atomic
def device_delete(*, actor, device: Device) -> None:
    """Deleting a device also takes its credential off the broker: the deletion is an enforcement change
    (a durable outbox row applied by the worker), exactly like a revocation."""
    from security.services import enforcement_enqueue

    before = device_snapshot(device)
    client_id = device.client_id
    device.delete()
    audit_record(actor=actor, action="device.delete", object_type="device", object_id=client_id, before=before)
    enforcement_enqueue(kind="device.delete", client_id=client_id, summary="device deleted", actor=actor)


def _named_snapshot(obj) -> dict:
    return {f.name: getattr(obj, f.name) for f in obj._meta.concrete_fields if f.name not in {"id", "created"}}


@transaction.atomic
def catalog_save(*, actor, instance: DeviceModel | DeviceGroup) -> DeviceModel | DeviceGroup:
    """Create or update a device model or a group (plain records with nothing enforced on the broker)."""
    creating = instance.pk is None
    before = None if creating else _named_snapshot(type(instance).objects.get(pk=instance.pk))
    instance.full_clean()
    instance.save()
    kind = instance._meta.model_name
    audit_record(
        actor=actor,
        action=f"{kind}.{'create' if creating else 'update'}",
        target=instance,
        object_id=instance.name,
        before=before,
        after=_named_snapshot(instance),
    )
    return instance


@transaction.atomic
def catalog_delete(*, actor, instance: DeviceModel | DeviceGroup) -> None:
    kind = instance._meta.model_name
    if kind == "devicemodel" and instance.devices.exists():
        raise ValidationError(
            f"{instance.devices.count()} device(s) still use model {instance.name!r}; move them to another model first."
        )
    before = _named_snapshot(instance)
    instance.delete()
    audit_record(actor=actor, action=f"{kind}.delete", object_type=kind, object_id=before["name"], before=before)


# --- CSV import and export -------------------------------------------------------------------------------

IMPORT_PROGRESS_EVERY = 500
IMPORT_BATCH = 1000
MAX_REPORTED_ERRORS = 1000


def import_job_create(*, actor, filename: str, content: str) -> ImportJob:
    """Store the upload and hand it to a worker; the job page shows progress and, if rejected, every bad row."""
    from .tasks import import_devices_csv

    job = ImportJob.objects.create(filename=filename[:255], content=content, created_by=actor if actor else None)
    audit_record(actor=actor, action="import.submit", target=job, after={"filename": job.filename})
    transaction.on_commit(lambda: _import_enqueue(import_devices_csv, job.pk))
    return job


def _import_enqueue(task, job_id: int) -> bool:
    """The job row is durable: when the queue (Redis) is unreachable the upload is kept, the job page says it
    waits for a worker, and import_jobs_requeue sends it again once the queue is back."""
    try:
        task.delay(job_id)
    except Exception:
        logger.warning("could not enqueue import job %s; it stays pending and will be re-sent", job_id, exc_info=True)
        return False
    return True


IMPORT_REQUEUE_AFTER = timedelta(minutes=1)


def import_jobs_requeue(*, older_than: timedelta = IMPORT_REQUEUE_AFTER) -> int:
    """Re-send jobs still waiting for a worker (the queue was down at upload, or the message was lost).
    Safe to repeat: a finished job is never run twice (import_job_run checks)."""
    from .tasks import import_devices_csv

    cutoff = timezone.now() - older_than
    ids = list(ImportJob.objects.filter(state=ImportJob.State.PENDING, created__lt=cutoff).values_list("pk", flat=True))
    return sum(_import_enqueue(import_devices_csv, job_id) for job_id in ids)


def _parse_rows(content: str) -> tuple[list[tuple[int, dict]], list[dict]]:
    reader = csv.DictReader(io.StringIO(content))
    header = [h.strip().lower() for h in (reader.fieldnames or [])]
    if "client_id" not in header:
        return [], [
            {
                "line": 1,
                "reason": f"The header must name the columns; it needs at least client_id. "
                f"Known columns: {', '.join(CSV_COLUMNS)}.",
            }
        ]
    unknown = sorted(set(header) - set(CSV_COLUMNS))
    if unknown:
        return [], [
            {
                "line": 1,
                "reason": f"Unknown column(s): {', '.join(unknown)}. Known: {', '.join(CSV_COLUMNS)}.",
            }
        ]
    reader.fieldnames = header
    rows = []
    for record in reader:
        if None in record:
            rows.append((reader.line_num, {"__error__": "This row has more fields than the header."}))
            continue
        rows.append((reader.line_num, {k: (v or "").strip() for k, v in record.items()}))
    return rows, []


def _validate_row(
    line: int, row: dict, *, models_by_name, groups_by_name, seen: dict
) -> tuple[Device | None, list, list]:
    errors = []
    if "__error__" in row:
        return None, [], [{"line": line, "reason": row["__error__"]}]
    client_id = row.get("client_id", "")
    if not client_id:
        errors.append("client_id is empty")
    elif not is_valid_client_id(client_id):
        errors.append(f"client_id {client_id!r} does not follow the fleet rule")
    elif client_id in seen:
        errors.append(f"client_id {client_id!r} appears twice in the file (also on line {seen[client_id]})")
    else:
        seen[client_id] = line
    try:
        mac = normalize_mac(row.get("mac", ""))
    except ValidationError as exc:
        errors.append(exc.messages[0])
        mac = ""
    model = None
    if row.get("model"):
        model = models_by_name.get(row["model"])
        if model is None:
            errors.append(f"unknown model {row['model']!r}: create it under Models first")
    groups = []
    for name in filter(None, (g.strip() for g in row.get("groups", "").split(";"))):
        group = groups_by_name.get(name)
        if group is None:
            errors.append(f"unknown group {name!r}: create it under Groups first")
        else:
            groups.append(group)
    for field, limit in (("name", 200), ("serial", 100), ("firmware_version", 64)):
        if len(row.get(field, "")) > limit:
            errors.append(f"{field} is longer than {limit} characters")
    if errors:
        return None, [], [{"line": line, "reason": "; ".join(errors)}]
    device = Device(
        client_id=client_id,
        name=row.get("name", ""),
        model=model,
        serial=row.get("serial", ""),
        mac=mac,
        firmware_version=row.get("firmware_version", ""),
    )
    return device, groups, []


def import_job_run(*, job_id: int) -> ImportJob:
    """Validate every row first and report each bad one with its line and reason; import all or nothing."""
    job = ImportJob.objects.select_related("created_by").get(pk=job_id)
    if job.done:
        return job  # a redelivered task must not import twice
    rows, errors = _parse_rows(job.content)
    job.state, job.total_rows, job.processed_rows = ImportJob.State.VALIDATING, len(rows), 0
    job.save(update_fields=["state", "total_rows", "processed_rows"])
    if not errors and not rows:
        errors = [{"line": 1, "reason": "The file has a header but no devices."}]

    models_by_name = {m.name: m for m in DeviceModel.objects.all()}
    groups_by_name = {g.name: g for g in DeviceGroup.objects.all()}
    seen: dict[str, int] = {}
    pending: list[tuple[int, Device, list]] = []
    for index, (line, row) in enumerate(rows, start=1):
        device, groups, row_errors = _validate_row(
            line, row, models_by_name=models_by_name, groups_by_name=groups_by_name, seen=seen
        )
        errors.extend(row_errors)
        if device is not None:
            pending.append((line, device, groups))
        if index % IMPORT_PROGRESS_EVERY == 0:
            ImportJob.objects.filter(pk=job.pk).update(processed_rows=index)
    # Ids already in the inventory, looked up in chunks rather than one query per row.
    ids = [d.client_id for _, d, _ in pending]
    existing = set()
    for start in range(0, len(ids), 900):
        existing.update(
            Device.objects.filter(client_id__in=ids[start : start + 900]).values_list("client_id", flat=True)
        )
    errors.extend(
        {"line": line, "reason": f"client_id {d.client_id!r} is already in the inventory"}
        for line, d, _ in pending
        if d.client_id in existing
    )

    if errors:
        errors.sort(key=lambda e: e["line"])
        job.state = ImportJob.State.FAILED
        job.errors = errors[:MAX_REPORTED_ERRORS]
        if len(errors) > MAX_REPORTED_ERRORS:
            job.errors.append({"line": None, "reason": f"... and {len(errors) - MAX_REPORTED_ERRORS} more bad rows"})
        job.processed_rows, job.finished = len(rows), timezone.now()
        job.save(update_fields=["state", "errors", "processed_rows", "finished"])
        audit_record(
            actor=job.created_by,
            action="import.reject",
            target=job,
            after={"filename": job.filename, "bad_rows": len(errors)},
        )
        return job

    job.state, job.processed_rows = ImportJob.State.IMPORTING, len(rows)
    job.save(update_fields=["state", "processed_rows"])
    with transaction.atomic():
        devices = [d for _, d, _ in pending]
        Device.objects.bulk_create(devices, batch_size=IMPORT_BATCH)
        # bulk_create sets primary keys where the database supports RETURNING (PostgreSQL, SQLite >= 3.35).
        if any(d.pk is None for d in devices):
            pks = {}
            for start in range(0, len(ids), 900):
                pks.update(Device.objects.filter(client_id__in=ids[start : start + 900]).values_list("client_id", "pk"))
            for d in devices:
                d.pk = pks[d.client_id]
        through = Device.groups.through
        links = [through(device_id=d.pk, devicegroup_id=g.pk) for _, d, groups in pending for g in groups]
        through.objects.bulk_create(links, batch_size=IMPORT_BATCH)
        from security.models import AuditEvent

        summary = audit_record(
            actor=job.created_by,
            action="import.apply",
            target=job,
            after={"filename": job.filename, "imported": len(devices)},
        )
        AuditEvent.objects.bulk_create(
            [
                AuditEvent(
                    actor=summary.actor,
                    actor_label=summary.actor_label,
                    action="device.create",
                    object_type="device",
                    object_id=device.client_id,
                    after={
                        "client_id": device.client_id,
                        "name": device.name,
                        "model": device.model.name if device.model else None,
                        "groups": sorted(g.name for g in groups),
                        "serial": device.serial,
                        "mac": device.mac,
                        "status": device.status,
                        "firmware_version": device.firmware_version,
                        "import_job": job.pk,
                    },
                    source_address=summary.source_address,
                    request_id=summary.request_id,
                )
                for _, device, groups in pending
            ],
            batch_size=IMPORT_BATCH,
        )
        job.state, job.imported_rows, job.finished = ImportJob.State.SUCCEEDED, len(devices), timezone.now()
        job.save(update_fields=["state", "imported_rows", "finished"])
    return job


def _csv_safe(value: str) -> str:
    """Spreadsheets run cells that start with = + - @ as formulas; an exported name must stay text."""
    return "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def device_export_rows(queryset) -> Iterator[list[str]]:
    """CSV rows for the devices in ``queryset`` (already filtered), streamed in chunks: the same columns
    the import takes, so an export can be edited and imported elsewhere."""
    yield CSV_COLUMNS + ["status", "last_seen"]
    for device in queryset.select_related("model").prefetch_related("groups").iterator(chunk_size=2000):
        row = [
            device.client_id,
            device.name,
            device.model.name if device.model_id else "",
            ";".join(sorted(g.name for g in device.groups.all())),
            device.serial,
            device.mac,
            device.firmware_version,
            device.status,
            device.last_seen.isoformat() if device.last_seen else "",
        ]
        yield [_csv_safe(v) for v in row]
