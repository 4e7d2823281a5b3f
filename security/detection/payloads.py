"""Sealed payloads in the consumer (docs/detection.md, "Payload encryption").

On the network thread, per message (O(1), no I/O): the device's key from an in-process cache, the envelope opened
with fleetkeeper_device.sealing, the counter checked against this process's replay window. Per batch, on the
processor thread: one Redis script checks every counter of the batch against the shared window (the same rule as
``sealing.ReplayWindow``), so a replay is caught whichever replica received the original; alerts are raised; the
key cache is refreshed every PAYLOAD_KEYS_REFRESH_SECONDS with the keys changed since (one query), and before the
batch is judged when a sealed message names a key the cache does not have (its messages are kept, bounded, and
opened again after).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from django.conf import settings
from django.db import DatabaseError

from fleetkeeper_device import sealing

from . import rules

if TYPE_CHECKING:
    from .consumer import Consumer, DeviceBatch

log = logging.getLogger("fleetkeeper.consumer")

SEALED = sealing.MARKER_BYTE
DEVICE_TO_CONSOLE = sealing.DEVICE_TO_CONSOLE
RETRY_MAX = 32  # sealed messages per device and batch kept to open again after a key refresh
NO_KEY_REASON = "sealed, but no payload key is on record for this device"
COUNTERS_MAX = 4096  # counters per device and batch checked against the shared window
SAMPLES_MAX = 3
# A sealed message with a key the cache lacks re-reads the changed keys before its batch is judged (one indexed
# query; at most once per batch, so a device flooding with a forged key costs one query per batch, not per message).
FORCED_REFRESH_SECONDS = 0.0

# Per device: KEYS hi, bits, totals; ARGV after the two globals: n, tampered, replayed locally, unencrypted, then n
# counters. Returns per device the 1-based indexes of the counters already seen ("r") or too old ("s"), and the
# highest counter accepted so far.
REPLAY_SCRIPT = """
local W = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local a = 3
local out = {}
for d = 1, #KEYS, 3 do
  local hk, bk, tk = KEYS[d], KEYS[d + 1], KEYS[d + 2]
  local n = tonumber(ARGV[a])
  local tampered, replayed, clear = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  a = a + 4
  local hi = tonumber(redis.call('GET', hk) or '0')
  local bad = {}
  for i = 1, n do
    local c = tonumber(ARGV[a])
    a = a + 1
    if c > hi then
      if c - hi >= W then
        redis.call('DEL', bk)
      else
        for j = hi + 1, c - 1 do redis.call('SETBIT', bk, j % W, 0) end
      end
      redis.call('SETBIT', bk, c % W, 1)
      hi = c
    elseif hi - c >= W then
      bad[#bad + 1] = 's' .. i
    elseif redis.call('SETBIT', bk, c % W, 1) == 1 then
      bad[#bad + 1] = 'r' .. i
    end
  end
  if n > 0 then
    redis.call('SET', hk, hi, 'EX', ttl)
    redis.call('EXPIRE', bk, ttl)
  end
  replayed = replayed + #bad
  if n > 0 then redis.call('HINCRBY', tk, 'sealed', n - #bad) end
  if tampered > 0 then redis.call('HINCRBY', tk, 'tampered', tampered) end
  if replayed > 0 then redis.call('HINCRBY', tk, 'replayed', replayed) end
  if clear > 0 then redis.call('HINCRBY', tk, 'unencrypted', clear) end
  out[#out + 1] = table.concat(bad, ',') .. ';' .. hi
end
return out
"""


@dataclass(slots=True)
class DeviceKey:
    key: sealing.PayloadKey
    required: bool


@dataclass(slots=True)
class SealedState:
    """One device's share of one batch, for sealed payloads (lives on DeviceBatch.sealed when there is any)."""

    counters: list  # (counter, channel) accepted by this process, to check against the shared window
    tampered: int = 0
    replayed: int = 0
    unencrypted: int = 0
    unknown_key: int = 0  # sealed with another key than the cached one, beyond RETRY_MAX; judged after the refresh
    unknown_key_id: bytes = b""
    retry: list | None = None  # (topic, channel, payload) to open again after the refresh
    samples: list | None = None
    replay_samples: list | None = None
    clear_samples: list | None = None


class KeyCache:
    """client id -> DeviceKey, read by the network thread (a dict swapped whole, never changed in place)."""

    def __init__(self):
        self.keys: dict[str, DeviceKey] = {}
        self.since = None
        self.loaded_at = 0.0
        self.refresh_seconds = settings.PAYLOAD_KEYS_REFRESH_SECONDS
        self.loads = 0

    def refresh(self, *, force: bool = False) -> bool:
        now = time.monotonic()
        wait = FORCED_REFRESH_SECONDS if force else self.refresh_seconds
        if self.loads and now - self.loaded_at < wait:
            return False
        from security.payloads import payload_keys_changed

        self.loaded_at = now
        try:
            changed, newest = payload_keys_changed(since=self.since)
        except DatabaseError:
            log.warning("payload keys could not be read; keeping the %d cached", len(self.keys), exc_info=True)
            return False
        keys = dict(self.keys)
        for loaded in changed:
            if loaded.key is None:
                current = keys.get(loaded.client_id)
                if current is not None and current.key.key_id_hex == loaded.key_id:
                    del keys[loaded.client_id]
            else:
                keys[loaded.client_id] = DeviceKey(loaded.key, loaded.required)
        self.keys, self.since = keys, newest
        self.loads += 1
        return True


def _state(device: DeviceBatch) -> SealedState:
    state = device.sealed
    if state is None:
        state = device.sealed = SealedState([])
    return state


def _sample(state: SealedState, attr: str, sample: dict) -> None:
    samples = getattr(state, attr)
    if samples is None:
        samples = []
        setattr(state, attr, samples)
    if len(samples) < SAMPLES_MAX:
        samples.append(sample)


def open_sealed(
    consumer: Consumer,
    device: DeviceBatch,
    client_id: str,
    channel: str,
    topic,
    payload: bytes,
    *,
    retrying: bool = False,
) -> bytes | None:
    """Network thread: the plaintext of a sealed message, or None when it is dropped (counted on ``device``)."""
    state = _state(device)
    entry = consumer.payload_keys.keys.get(client_id)
    try:
        if entry is None:
            raise sealing.UnknownKey(f"no payload key on record for {client_id}")
        opened = entry.key.open(payload, topic=topic, client_id=client_id, direction=DEVICE_TO_CONSOLE)
        windows = consumer.replay_windows
        window = windows.get(client_id)
        if window is None or window[0] != opened.key_id:
            window = windows[client_id] = (opened.key_id, sealing.ReplayWindow())
        window[1].accept(opened.counter)
    except sealing.UnknownKey:
        # No key on record: malformed for now (a device without a key sent bytes that are not JSON); kept to open
        # again after the refresh, in case its key was issued since the cache was loaded.
        consumer._malformed(device, channel, NO_KEY_REASON, len(payload))
        if not retrying and (state.retry is None or len(state.retry) < RETRY_MAX):
            if state.retry is None:
                state.retry = []
            state.retry.append((topic, channel, payload, True))
            consumer.payload_refresh_wanted = True
        return None
    except sealing.WrongKey as exc:
        if not retrying:
            # Perhaps a key issued (or re-issued) since the cache was loaded: decided after the next refresh.
            if state.retry is None:
                state.retry = []
            if len(state.retry) < RETRY_MAX:
                state.retry.append((topic, channel, payload, False))
            else:
                state.unknown_key += 1
                state.unknown_key_id = bytes(payload[2:10])
            consumer.payload_refresh_wanted = True
            return None
        state.tampered += 1
        _sample(state, "samples", _describe(exc, channel, payload))
        return None
    except sealing.Replayed as exc:
        state.replayed += 1
        _sample(state, "replay_samples", _describe(exc, channel, payload))
        return None
    except sealing.SealingError as exc:
        state.tampered += 1
        _sample(state, "samples", _describe(exc, channel, payload))
        return None
    if len(state.counters) < COUNTERS_MAX:
        state.counters.append((opened.counter, channel))
    return opened.plaintext


def count_unencrypted(device: DeviceBatch, channel: str, size: int) -> None:
    """Network thread: a clear-text message from a device that must seal (dropped)."""
    state = _state(device)
    state.unencrypted += 1
    _sample(state, "clear_samples", {"channel": channel, "reason": "unencrypted", "size": size})


def _describe(exc: sealing.SealingError, channel: str, payload: bytes) -> dict:
    sample = {"channel": channel, "reason": exc.code, "detail": str(exc)[:200], "size": len(payload)}
    try:
        header = sealing.peek(payload)
    except sealing.SealingError:
        return sample
    sample.update(counter=header.counter, key_id=header.key_id_hex)
    return sample


def process_batch(consumer: Consumer, devices: dict[str, DeviceBatch]) -> list[rules.Finding]:
    """Processor thread, before the batch is ingested: second chance for unknown keys, the shared replay window,
    per-device totals in Redis, and the findings."""
    sealed = {cid: d for cid, d in devices.items() if d.sealed is not None}
    if consumer.payload_refresh_wanted or not consumer.payload_keys.loads:
        consumer.payload_refresh_wanted = False
        consumer.payload_keys.refresh(force=True)
    else:
        consumer.payload_keys.refresh()
    if not sealed:
        return []
    for client_id, device in sealed.items():
        state = device.sealed
        retry, state.retry = state.retry, None
        if retry:
            entry = consumer.payload_keys.keys.get(client_id)
            with consumer._lock:  # the replay windows are the network thread's, which folds under this lock
                for topic, channel, payload, counted_malformed in retry:
                    if counted_malformed:
                        if entry is None:
                            continue  # still no key: it stays a malformed message
                        device.malformed -= 1
                        if not device.malformed:
                            device.malformed_reason, device.malformed_samples = "", []
                    consumer._fold(device, client_id, channel, topic, payload, retrying=True)
        if state.unknown_key:  # beyond RETRY_MAX: judged against the refreshed key (dropped either way)
            entry = consumer.payload_keys.keys.get(client_id)
            if entry is None or entry.key.key_id != state.unknown_key_id:
                state.tampered += state.unknown_key
                detail = f"sealed with key id {state.unknown_key_id.hex()}, not this device's key"
                _sample(state, "samples", {"channel": "", "reason": "wrong_key", "detail": detail, "size": 0})
            state.unknown_key = 0

    prefix = consumer.prefix
    keys, args = [], [sealing.WINDOW, settings.PAYLOAD_REPLAY_STATE_DAYS * 86400]
    ids = list(sealed)
    for client_id in ids:
        state = sealed[client_id].sealed
        entry = consumer.payload_keys.keys.get(client_id)
        key_id = entry.key.key_id_hex if entry is not None else "none"
        keys += [f"{prefix}:sh:{client_id}:{key_id}", f"{prefix}:sb:{client_id}:{key_id}", f"{prefix}:p:{client_id}"]
        args += [len(state.counters), state.tampered, state.replayed, state.unencrypted]
        args += [counter for counter, _channel in state.counters]
    reply = consumer._replay_script(keys=keys, args=args)

    findings: list[rules.Finding] = []
    for client_id, raw in zip(ids, reply, strict=True):
        device = sealed[client_id]
        state = device.sealed
        bad, highest = (raw.decode() if isinstance(raw, bytes) else raw).split(";")
        for mark in filter(None, bad.split(",")):
            # Accepted by this process but seen by another (or before a restart): counted and alerted; its
            # readings were already folded into this batch (they are the device's own, authentic, earlier ones).
            counter, channel = state.counters[int(mark[1:]) - 1]
            state.replayed += 1
            if channel == "telemetry" and device.telemetry:
                device.telemetry -= 1
            reason = "stale" if mark[0] == "s" else "replayed"
            _sample(
                state,
                "replay_samples",
                {
                    "channel": channel,
                    "reason": reason,
                    "counter": counter,
                    "detail": f"seen by another consumer; highest accepted {highest}",
                },
            )
        consumer.stats.sealed_opened += len(state.counters)
        consumer.stats.sealed_tampered += state.tampered
        consumer.stats.sealed_replayed += state.replayed
        consumer.stats.unencrypted += state.unencrypted
        if state.tampered:
            findings.append(
                rules.Finding(
                    "payload_tampered",
                    subject=client_id,
                    client_id=client_id,
                    summary=f"{client_id}: {state.tampered} sealed message(s) did not open "
                    f"({(state.samples or [{}])[0].get('reason', 'tampered')})",
                    evidence={"counts": {"undecryptable": state.tampered}, "samples": state.samples or []},
                )
            )
        if state.replayed:
            findings.append(
                rules.Finding(
                    "payload_replayed",
                    subject=client_id,
                    client_id=client_id,
                    summary=f"{client_id}: {state.replayed} replayed sealed message(s) dropped",
                    evidence={
                        "counts": {"replayed": state.replayed},
                        "highest_counter": int(highest),
                        "samples": state.replay_samples or [],
                    },
                )
            )
        if state.unencrypted:
            findings.append(
                rules.Finding(
                    "payload_unencrypted",
                    subject=client_id,
                    client_id=client_id,
                    summary=f"{client_id}: {state.unencrypted} clear-text message(s) dropped; this device must seal",
                    evidence={"counts": {"unencrypted": state.unencrypted}, "samples": state.clear_samples or []},
                )
            )
    return findings


def device_totals(redis_client, client_id: str) -> dict[str, int]:
    """What the consumers counted for a device, all time (the device page): sealed, tampered, replayed,
    unencrypted."""
    raw = redis_client.hgetall(f"{settings.DETECTION_REDIS_PREFIX}:p:{client_id}")
    return {k.decode(): int(v) for k, v in raw.items()}
