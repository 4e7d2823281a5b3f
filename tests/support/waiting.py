"""Waiting on a condition instead of sleeping: the one polling helper the suite uses."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.02) -> bool:
    """True as soon as ``predicate()`` is true; False once ``timeout`` seconds have passed (it is asked one last
    time then). Callers say what they waited for: ``assert wait_until(lambda: ..., 5), "the device never ..."``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
