"""One batch of aggregated device messages -> Redis (rolling state, counters), the database (bulk) and alerts.

Per batch, whatever its size: one Redis call (a Lua script updating every device's counters, window and baseline),
plus a read of learned value ranges for devices whose cached copy is older than DETECTION_STATE_CACHE_SECONDS (and
a write of the ranges this replica extended). The database is written at most once per DETECTION_DB_FLUSH_SECONDS:
one UPDATE for last_seen, one upsert per row shape for DeviceActivity, one SELECT for devices with a new status,
so the database cost does not grow with the message rate. Alerts are raised as they are found.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from django.conf import settings
from django.db import OperationalError, transaction

from devices.models import Device
from security.audit import audit_context
from security.models import SEVERITY_RANK, DeviceActivity

from . import baseline, rules
from .alerts import _merge_evidence, alert_raise

if TYPE_CHECKING:
    from .consumer import Consumer, DeviceBatch


def _key(consumer: Consumer, *parts) -> str:
    return ":".join([consumer.prefix, *map(str, parts)])


class PendingWrites:
    """What the next database flush writes: the newest totals and status per device (bounded by the fleet)."""

    def __init__(self):
        self.activity: dict[str, dict] = {}
        self.seen_at = 0.0
        self.last_flush = 0.0

    def __len__(self) -> int:
        return len(self.activity)


def ingest_batch(consumer: Consumer, devices: dict[str, DeviceBatch]) -> list[rules.Finding]:
    now = time.time()
    window_seconds = settings.DETECTION_WINDOW_SECONDS
    window = int(now // window_seconds)
    ids = list(devices)
    prefix = consumer.prefix

    # 1. Redis: counters, windows and baselines for every device in one script call.
    keys, args = (
        [],
        [
            window,
            settings.DETECTION_BASELINE_ALPHA,
            window_seconds * 3,
            settings.DETECTION_RATE_FACTOR,
            settings.DETECTION_RATE_MIN_EXCESS,
        ],
    )
    for client_id in ids:
        d = devices[client_id]
        keys += [
            f"{prefix}:w:{client_id}:{window}",
            f"{prefix}:w:{client_id}:{window - 1}",
            f"{prefix}:b:{client_id}",
            f"{prefix}:c:{client_id}",
        ]
        args += [d.messages, d.bytes, d.malformed, d.telemetry]
    reply = consumer._window_script(keys=keys, args=args)
    per_device = (reply.decode() if isinstance(reply, bytes) else reply).split(";")

    findings: list[rules.Finding] = []
    pending = consumer.pending
    cache = consumer.value_cache
    stale = [
        cid
        for cid in ids
        if consumer.detectors
        and devices[cid].values
        and now - cache.get(cid, (0.0, {}, False))[0] > consumer.cache_seconds
    ]
    if stale:
        refresh_values(consumer, stale, now)
    for i, client_id in enumerate(ids):
        d = devices[client_id]
        n, b, rate, size, windows, messages, total_bytes, malformed, telemetry = per_device[i].split(",")
        state = baseline.WindowState(int(n), int(b), float(rate), float(size), int(windows))
        row = pending.activity.setdefault(client_id, {})
        row.update(messages=int(messages), bytes=int(total_bytes), malformed=int(malformed), telemetry=int(telemetry))
        if d.malformed:
            row.update(last_malformed_at=now, last_malformed_reason=d.malformed_reason[:255])
            findings.append(
                rules.Finding(
                    "malformed_messages",
                    subject=client_id,
                    client_id=client_id,
                    summary=f"{client_id} sent malformed messages ({d.malformed_reason[:120]})",
                    evidence={"counts": {"malformed": d.malformed}, "samples": d.malformed_samples},
                )
            )
        if d.status:
            row.update(last_status=d.status, last_status_at=now)
        if not consumer.detectors:
            continue
        if baseline.rate_anomaly(state, consumer.thresholds):
            limit = baseline.rate_threshold(state, consumer.thresholds)
            findings.append(
                rules.Finding(
                    "rate_anomaly",
                    subject=client_id,
                    client_id=client_id,
                    summary=f"{client_id} sent {state.messages} messages in {window_seconds} s (limit {limit:.0f})",
                    evidence={
                        "messages_in_window": state.messages,
                        "window_seconds": window_seconds,
                        "baseline_per_window": round(state.rate, 2),
                        "baseline_windows": state.windows,
                        "threshold": round(limit, 2),
                    },
                )
            )
        if baseline.size_anomaly(d.messages, d.bytes, state, consumer.thresholds):
            findings.append(
                rules.Finding(
                    "size_anomaly",
                    subject=client_id,
                    client_id=client_id,
                    summary=f"{client_id} sent messages of {d.bytes // d.messages} bytes on average "
                    f"(usually {state.size:.0f})",
                    evidence={
                        "average_bytes": d.bytes // d.messages,
                        "largest_bytes": d.max_size,
                        "baseline_bytes": round(state.size, 1),
                    },
                )
            )
        if d.values:
            fetched_at, learned, _dirty = cache.get(client_id, (now, {}, False))
            batch = {name: (v[0], v[1], v[2]) for name, v in d.values.items()}
            out, updated = baseline.value_check(
                learned,
                batch,
                min_samples=settings.DETECTION_VALUE_MIN_SAMPLES,
                margin=settings.DETECTION_VALUE_MARGIN,
            )
            if updated:
                cache[client_id] = (fetched_at, {**learned, **updated}, True)
            for finding in out:
                findings.append(
                    rules.Finding(
                        "value_out_of_range",
                        subject=f"{client_id}:{finding['reading']}",
                        client_id=client_id,
                        summary=f"{client_id}: {finding['reading']} outside its learned range",
                        evidence={**finding, "samples": [finding]},
                    )
                )
    pending.seen_at = now
    if findings:
        with_db_retry(lambda: raise_findings(findings))
    if now - pending.last_flush >= consumer.db_flush_seconds:
        flush_pending(consumer)
    return findings


def refresh_values(consumer: Consumer, ids: list[str], now: float) -> None:
    """Write back the ranges this replica extended, then read every replica's (Redis is the shared truth; the
    local copy saves two round trips per device per batch)."""
    pipe = consumer.redis.pipeline(transaction=False)
    cache = consumer.value_cache
    for client_id in ids:
        entry = cache.get(client_id)
        if entry is not None and entry[2] and entry[1]:
            pipe.hset(
                f"{consumer.prefix}:v:{client_id}",
                mapping={name: f"{lo!r},{hi!r},{count}" for name, (lo, hi, count) in entry[1].items()},
            )
        pipe.hgetall(f"{consumer.prefix}:v:{client_id}")
    results = [r for r in pipe.execute() if isinstance(r, dict)]
    for client_id, raw in zip(ids, results, strict=True):
        cache[client_id] = (now, _decode_ranges(raw), False)
    if len(cache) > consumer.cache_max:
        for client_id in list(cache)[: len(cache) - consumer.cache_max]:
            del cache[client_id]


def flush_pending(consumer: Consumer) -> None:
    """The database half, in bulk (retried: Redis has already counted these messages)."""
    pending = consumer.pending
    rows, pending.activity = pending.activity, {}
    pending.last_flush = time.time()
    if rows:
        with_db_retry(lambda: _write(consumer, rows, pending.seen_at))


def with_db_retry(fn, attempts: int = 5):
    """A busy database (SQLite's lock, a PostgreSQL failover) delays a write instead of losing it."""
    for attempt in range(attempts):
        try:
            return fn()
        except OperationalError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.1 * (attempt + 1))


def _write(consumer: Consumer, rows: dict[str, dict], seen_at: float) -> None:
    from datetime import UTC, datetime

    def dt(ts: float) -> datetime:
        return datetime.fromtimestamp(ts, tz=UTC)

    findings: list[rules.Finding] = []
    statuses = {cid: row["last_status"] for cid, row in rows.items() if row.get("last_status")}
    groups: dict[tuple[bool, bool], list[DeviceActivity]] = {}
    for client_id, row in rows.items():
        activity = DeviceActivity(
            client_id=client_id,
            messages=row["messages"],
            bytes=row["bytes"],
            malformed=row["malformed"],
            telemetry=row["telemetry"],
            last_message_at=dt(seen_at),
            last_malformed_at=dt(row["last_malformed_at"]) if row.get("last_malformed_at") else None,
            last_malformed_reason=row.get("last_malformed_reason", ""),
            last_status=row.get("last_status"),
            last_status_at=dt(row["last_status_at"]) if row.get("last_status_at") else None,
        )
        groups.setdefault((bool(activity.last_malformed_at), bool(activity.last_status_at)), []).append(activity)
    with transaction.atomic():
        Device.objects.filter(client_id__in=list(rows)).update(last_seen=dt(seen_at))
        # One upsert per shape of row (bulk_create's update_fields apply to every row in the statement).
        for (has_malformed, has_status), group in groups.items():
            fields = ["messages", "bytes", "malformed", "telemetry", "last_message_at"]
            fields += ["last_malformed_at", "last_malformed_reason"] if has_malformed else []
            fields += ["last_status", "last_status_at"] if has_status else []
            DeviceActivity.objects.bulk_create(
                group, update_conflicts=True, unique_fields=["client_id"], update_fields=fields, batch_size=500
            )
        if statuses:
            known = {
                d.client_id: d for d in Device.objects.filter(client_id__in=list(statuses)).select_related("model")
            }
            for client_id, status in statuses.items():
                device = known.get(client_id)
                firmware = str(status.get("firmware", ""))[:64]
                if device is None or not firmware:
                    continue
                if device.firmware_version != firmware:
                    Device.objects.filter(pk=device.pk).update(firmware_version=firmware)
                if consumer.detectors and device.model is not None:
                    findings += firmware_findings(device, firmware)
    raise_findings(findings)


def firmware_findings(device: Device, firmware: str) -> list[rules.Finding]:
    """Judged against the firmware registry (devices/firmware/detection.py: stale, below minimum, withdrawn,
    known-vulnerable), from the model row alone."""
    from devices.firmware.detection import firmware_findings as registry_findings

    return registry_findings(device, firmware)


def _decode_ranges(raw: dict) -> dict[str, tuple[float, float, int]]:
    ranges = {}
    for name, value in raw.items():
        try:
            lo, hi, count = value.decode().split(",")
            ranges[name.decode()] = (float(lo), float(hi), int(count))
        except (ValueError, AttributeError):
            continue
    return ranges


def raise_findings(findings: list[rules.Finding]) -> None:
    """Findings -> alerts: one alert_raise per (kind, subject) per batch, with the device looked up in one query."""
    if not findings:
        return
    merged: dict[tuple[str, str], tuple[rules.Finding, int]] = {}
    for finding in findings:
        key = (finding.kind, finding.subject)
        if key in merged:
            first, count = merged[key]
            first.evidence = _merge_evidence(first.evidence, finding.evidence)
            first.summary = finding.summary
            if SEVERITY_RANK.get(finding.severity or "", -1) > SEVERITY_RANK.get(first.severity or "", -1):
                first.severity = finding.severity
            merged[key] = (first, count + 1)
        else:
            merged[key] = (finding, 1)
    ids = {f.client_id for f, _ in merged.values() if f.client_id}
    known = {d.client_id: d for d in Device.objects.filter(client_id__in=ids)} if ids else {}
    with audit_context(service="detection"):
        for finding, count in merged.values():
            alert_raise(
                kind=finding.kind,
                subject=finding.subject,
                summary=finding.summary,
                evidence=finding.evidence,
                severity=finding.severity,
                device=known.get(finding.client_id),
                client_id=finding.client_id,
                occurrences=count,
            )
