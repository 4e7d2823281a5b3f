"""One thread, many MQTT connections: a selector loop that drives paho-mqtt clients.

paho's own ``loop_start()`` costs a thread per client; a simulator holding thousands of devices (or a
gateway speaking for many) cannot afford that. paho 2 supports external loops: it tells us when a
socket opens, closes, and has data to write (``on_socket_*`` callbacks); we call ``loop_read``,
``loop_write`` and ``loop_misc`` when the socket is ready or a second has passed.

Writes take a fast path: a publish marks its client "pending" and the loop writes it at the end of
the iteration, without touching the selector; only a socket that could not take everything (the
kernel buffer is full) is registered for write readiness.

Everything that touches a client runs on the reactor's thread. Other threads hand work over with
``call_soon_threadsafe``.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

log = logging.getLogger(__name__)

MISC_INTERVAL = 1.0  # seconds between loop_misc() calls (keepalive pings, timeouts)


class Timer:
    __slots__ = ("when", "callback", "args", "cancelled")

    def __init__(self, when: float, callback: Callable[..., Any], args: tuple):
        self.when = when
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Reactor:
    def __init__(self, *, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._selector = selectors.DefaultSelector()
        self._timers: list[tuple[float, int, Timer]] = []
        self._sequence = itertools.count()
        self._clients: set[mqtt.Client] = set()
        self._write_registered: dict[mqtt.Client, bool] = {}
        self._pending_write: set[mqtt.Client] = set()
        self._handoff: deque[tuple[Callable[..., Any], tuple]] = deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._stopping = False
        self._thread_id: int | None = None
        self._thread: threading.Thread | None = None
        self.closed = False

    # --- clients
    def attach(self, client: mqtt.Client) -> None:
        """Drive ``client`` from this loop. Call before its first connect; on the reactor's thread."""
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write
        self._clients.add(client)

    def detach(self, client: mqtt.Client) -> None:
        self._clients.discard(client)
        self._pending_write.discard(client)

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock) -> None:
        self._clients.add(client)
        self._write_registered[client] = False
        self._selector.register(sock, selectors.EVENT_READ, client)

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock) -> None:
        self._pending_write.discard(client)
        self._write_registered.pop(client, None)
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError):
            pass

    def _on_socket_register_write(self, client: mqtt.Client, userdata: Any, sock) -> None:
        self._pending_write.add(client)
        if self._thread_id is not None and threading.get_ident() != self._thread_id:
            self._wake()

    def _on_socket_unregister_write(self, client: mqtt.Client, userdata: Any, sock) -> None:
        self._pending_write.discard(client)
        if self._write_registered.get(client):
            self._write_registered[client] = False
            try:
                self._selector.modify(sock, selectors.EVENT_READ, client)
            except (KeyError, ValueError):
                pass

    def _flush_writes(self) -> None:
        while self._pending_write:
            batch = list(self._pending_write)
            self._pending_write.clear()
            for client in batch:
                client.loop_write()
                sock = client.socket()
                if sock is not None and client.want_write() and not self._write_registered.get(client, True):
                    # The kernel buffer is full: wait for the socket to become writable.
                    self._write_registered[client] = True
                    try:
                        self._selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)
                    except (KeyError, ValueError):
                        pass
                    self._pending_write.discard(client)

    # --- time
    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> Timer:
        return self.call_at(self.clock() + max(0.0, delay), callback, *args)

    def call_at(self, when: float, callback: Callable[..., Any], *args: Any) -> Timer:
        """Run ``callback(*args)`` when the reactor clock reaches ``when``. On the reactor's thread only."""
        timer = Timer(when, callback, args)
        heapq.heappush(self._timers, (when, next(self._sequence), timer))
        return timer

    def call_soon_threadsafe(self, callback: Callable[..., Any], *args: Any) -> None:
        self._handoff.append((callback, args))
        self._wake()

    def in_loop_thread(self) -> bool:
        return self._thread_id is None or threading.get_ident() == self._thread_id

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass

    # --- running
    def stop(self) -> None:
        """Make ``run`` return after the current iteration. Safe from any thread and from signal handlers."""
        self._stopping = True
        self._wake()

    def run(self, *, until: float | None = None) -> None:
        """Run until ``stop()`` (or until the reactor clock reaches ``until``)."""
        self._thread_id = threading.get_ident()
        self._stopping = False
        next_misc = self.clock() + MISC_INTERVAL
        try:
            while not self._stopping:
                now = self.clock()
                if until is not None and now >= until:
                    break
                timeout = next_misc - now
                if self._timers:
                    timeout = min(timeout, self._timers[0][0] - now)
                if until is not None:
                    timeout = min(timeout, until - now)
                if self._pending_write or self._handoff:
                    timeout = 0
                for key, mask in self._selector.select(max(0.0, timeout)):
                    client = key.data
                    if client is None:
                        self._drain_wake()
                        continue
                    try:
                        if mask & selectors.EVENT_READ:
                            client.loop_read()
                        if mask & selectors.EVENT_WRITE and client.socket() is not None:
                            client.loop_write()
                    except Exception:
                        log.exception("error while driving MQTT client %s", client._client_id)
                while self._handoff:
                    callback, args = self._handoff.popleft()
                    self._run_callback(callback, args)
                self._run_timers()
                self._flush_writes()
                now = self.clock()
                if now >= next_misc:
                    next_misc = now + MISC_INTERVAL
                    for client in list(self._clients):
                        if client.socket() is not None:
                            client.loop_misc()
                    self._flush_writes()
        finally:
            self._thread_id = None

    def _run_timers(self) -> None:
        now = self.clock()
        while self._timers and self._timers[0][0] <= now:
            _, _, timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                self._run_callback(timer.callback, timer.args)

    def _run_callback(self, callback: Callable[..., Any], args: tuple) -> None:
        try:
            callback(*args)
        except Exception:
            log.exception("error in reactor callback %r", callback)

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def start_thread(self, name: str = "fleetkeeper-device-reactor") -> threading.Thread:
        """Run the loop in a daemon thread (a single device, or a test)."""
        ready = threading.Event()

        def target() -> None:
            self._thread_id = threading.get_ident()
            ready.set()
            self.run()

        self._thread = threading.Thread(target=target, name=name, daemon=True)
        self._thread.start()
        ready.wait()
        return self._thread

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()
