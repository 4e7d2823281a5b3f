"""Remembering which console messages were already handled, in bounded memory.

MQTT QoS 1 delivers at least once: after a reconnect the broker may hand the device a command it
already executed, and the console may re-send one whose ack it has not seen yet. The device answers
each message id once and does its work once; duplicates are dropped silently.
"""

from __future__ import annotations

import threading
from collections import OrderedDict


class Deduplicator:
    """The last ``capacity`` message ids. Oldest ids are forgotten first; a hit refreshes an id.

    Memory is bounded by ``capacity`` (ids are at most 64 characters). A device that reboots forgets
    what it saw: give it a deduplicator pre-loaded with ``remember()`` from persistent storage if
    commands must survive reboots exactly once; the console's message ``expires`` is the other guard.
    """

    def __init__(self, capacity: int = 1024):
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def first_time(self, message_id: str) -> bool:
        """True the first time an id is seen (and records it); False for every repeat still remembered."""
        with self._lock:
            if message_id in self._seen:
                self._seen.move_to_end(message_id)
                return False
            self._seen[message_id] = None
            if len(self._seen) > self.capacity:
                self._seen.popitem(last=False)
            return True

    def remember(self, message_ids) -> None:
        for message_id in message_ids:
            self.first_time(message_id)

    def __contains__(self, message_id: str) -> bool:
        with self._lock:
            return message_id in self._seen

    def __len__(self) -> int:
        return len(self._seen)

    def snapshot(self) -> list[str]:
        """Oldest first, for persisting."""
        with self._lock:
            return list(self._seen)
