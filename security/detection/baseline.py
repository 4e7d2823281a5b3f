"""Per-device rolling state in Redis, so any consumer replica can process any device's messages (a shared
subscription spreads one device's messages across replicas).

Per device and window (DETECTION_WINDOW_SECONDS): a message and byte counter that every replica increments
atomically; when a window is over, its totals are folded into the device's baseline (an exponentially weighted
mean of messages per window and bytes per message), at most once, by a Lua script, so the replicas agree. An
anomalous window is clipped before it is folded: a flood does not teach the baseline that floods are normal.
Telemetry readings keep a learned [low, high] per reading name.
"""

from __future__ import annotations

from dataclasses import dataclass

# One call per batch for every device in it (one round trip, one command to encode).
# KEYS, 4 per device: current window hash, previous window hash, baseline hash, lifetime counters hash.
# ARGV: window, alpha, ttl, factor, min_excess, then 4 per device: messages, bytes, malformed, telemetry.
# Returns one string (one reply to parse, not 9 per device): per device, ';'-separated, 9 ','-separated numbers:
# current window messages, current window bytes, baseline rate, baseline size, folded windows, and the lifetime
# totals of messages, bytes, malformed and telemetry.
WINDOW_SCRIPT = """
local win = tonumber(ARGV[1])
local alpha = tonumber(ARGV[2])
local ttl = ARGV[3]
local factor = tonumber(ARGV[4])
local min_excess = tonumber(ARGV[5])
local out = {}
for d = 0, (#KEYS / 4) - 1 do
  local k = d * 4
  local a = 5 + d * 4
  local cur, prevkey, basekey, counters = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4]
  local total = redis.call('HINCRBY', counters, 'messages', ARGV[a + 1])
  local total_bytes = redis.call('HINCRBY', counters, 'bytes', ARGV[a + 2])
  local malformed = redis.call('HINCRBY', counters, 'malformed', ARGV[a + 3])
  local telemetry = redis.call('HINCRBY', counters, 'telemetry', ARGV[a + 4])
  local n = redis.call('HINCRBY', cur, 'n', ARGV[a + 1])
  local b = redis.call('HINCRBY', cur, 'b', ARGV[a + 2])
  redis.call('EXPIRE', cur, ttl)
  local base = redis.call('HMGET', basekey, 'win', 'rate', 'size', 'windows')
  local folded = tonumber(base[1] or '-1')
  local rate = tonumber(base[2] or '0')
  local size = tonumber(base[3] or '0')
  local windows = tonumber(base[4] or '0')
  if folded < win - 1 then
    local prev = redis.call('HMGET', prevkey, 'n', 'b')
    local pn = tonumber(prev[1] or '0')
    local pb = tonumber(prev[2] or '0')
    if folded >= 0 and pn > 0 then
      local ceiling = math.max(rate * factor, rate + min_excess)
      local clipped = pn
      if windows > 0 and pn > ceiling then clipped = ceiling end
      if windows == 0 then rate = clipped else rate = rate + alpha * (clipped - rate) end
      local psize = pb / pn
      if windows == 0 then size = psize
      else size = size + alpha * (math.min(psize, size * factor + 1) - size) end
      windows = windows + 1
    end
    redis.call('HSET', basekey, 'win', win - 1, 'rate', tostring(rate), 'size', tostring(size), 'windows', windows)
  end
  out[d + 1] = table.concat({n, b, tostring(rate), tostring(size), windows, total, total_bytes, malformed,
    telemetry}, ',')
end
return table.concat(out, ';')
"""


@dataclass(frozen=True)
class Thresholds:
    min_windows: int
    rate_factor: float
    rate_min_excess: int
    rate_absolute: int
    size_factor: float
    size_min_bytes: int


@dataclass(frozen=True)
class WindowState:
    messages: int  # so far in the current window, all replicas together
    bytes: int
    rate: float  # baseline messages per window
    size: float  # baseline bytes per message
    windows: int  # windows folded into the baseline


def rate_threshold(state: WindowState, t: Thresholds) -> float:
    if state.windows >= t.min_windows:
        return max(state.rate * t.rate_factor, state.rate + t.rate_min_excess)
    return float(t.rate_absolute)


def rate_anomaly(state: WindowState, t: Thresholds) -> bool:
    """More messages in this window than the device's own baseline allows (or the absolute ceiling while the
    baseline is still being learned)."""
    return state.messages > rate_threshold(state, t)


def size_anomaly(batch_messages: int, batch_bytes: int, state: WindowState, t: Thresholds) -> bool:
    """This batch's messages are on average far larger than the device's usual size."""
    if batch_messages <= 0 or state.windows < t.min_windows:
        return False
    average = batch_bytes / batch_messages
    return average > max(state.size * t.size_factor, t.size_min_bytes)


def value_check(
    learned: dict[str, tuple[float, float, int]],
    batch: dict[str, tuple[float, float, int]],
    *,
    min_samples: int,
    margin: float,
) -> tuple[list[dict], dict[str, tuple[float, float, int]]]:
    """Compare a batch's [min, max] per reading with the learned range. Returns (out of range findings, the new
    learned ranges). Out-of-range values are not learned."""
    findings: list[dict] = []
    updated: dict[str, tuple[float, float, int]] = {}
    for name, (low, high, count) in batch.items():
        if name in learned:
            l_low, l_high, l_count = learned[name]
        else:
            l_low, l_high, l_count = low, high, 0
        if l_count >= min_samples:
            span = max(l_high - l_low, abs(l_high) * 0.05, 1e-9)
            floor, ceiling = l_low - margin * span, l_high + margin * span
            if low < floor or high > ceiling:
                findings.append(
                    {
                        "reading": name,
                        "seen_min": low,
                        "seen_max": high,
                        "learned_min": l_low,
                        "learned_max": l_high,
                        "allowed": [floor, ceiling],
                    }
                )
                continue
        updated[name] = (min(l_low, low), max(l_high, high), l_count + count)
    return findings, updated
