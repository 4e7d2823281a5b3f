"""Reconnect delays: exponential, capped, with jitter so a fleet does not reconnect in lockstep.

When a broker restarts, every device loses its connection in the same second. Without jitter they
all come back in the same second too, again and again; with it their attempts spread out.
"""

from __future__ import annotations

import random


class Backoff:
    """``next()`` returns the delay before the next attempt; ``reset()`` after a connection that held.

    Attempt n (from 0) waits a random time in ``[base/2, base]`` with ``base = min(maximum,
    initial * multiplier**n)`` ("equal jitter"): never less than half the nominal delay, so a broker
    that refuses everyone is not hammered, and never more than ``maximum``.
    """

    def __init__(
        self,
        initial: float = 1.0,
        maximum: float = 60.0,
        multiplier: float = 2.0,
        rng: random.Random | None = None,
    ):
        if initial <= 0 or maximum < initial or multiplier < 1:
            raise ValueError("need 0 < initial <= maximum and multiplier >= 1")
        self.initial = initial
        self.maximum = maximum
        self.multiplier = multiplier
        self.attempts = 0
        self._rng = rng or random.Random()

    def nominal(self, attempt: int) -> float:
        """The delay before jitter for attempt ``attempt`` (0-based)."""
        # Cap the exponent so huge attempt counts cannot overflow a float.
        return min(self.maximum, self.initial * self.multiplier ** min(attempt, 64))

    def next(self) -> float:
        base = self.nominal(self.attempts)
        self.attempts += 1
        return base / 2 + self._rng.uniform(0, base / 2)

    def reset(self) -> None:
        self.attempts = 0
