"""Many MQTT connections from one Python thread: raw MQTT 3.1.1 CONNECT packets on non-blocking sockets driven by
one selector (a thread or a paho client per connection would measure Python, not the broker)."""

from __future__ import annotations

import selectors
import socket
import time
from dataclasses import dataclass, field

from security.detection.wire import connect_packet  # the one MQTT 3.1.1 encoder (no Django import)


@dataclass
class ConnectResult:
    ok: int = 0
    refused: int = 0
    errors: int = 0
    elapsed: float = 0.0
    sockets: list = field(default_factory=list)


def connect_many(
    port: int,
    credentials: list[tuple[str, str]],
    *,
    host: str = "127.0.0.1",
    concurrency: int = 50,
    timeout: float = 120.0,
    retry_refused_connect: bool = True,
) -> ConnectResult:
    """Connect every (username, password) and wait for its CONNACK; keep the accepted sockets open.
    At most ``concurrency`` handshakes are in flight: Mosquitto listens with a backlog of 100, and a SYN beyond it
    is dropped and retried by TCP after a full second, which would measure the backlog, not the broker."""
    selector = selectors.DefaultSelector()
    result = ConnectResult()
    queue = list(reversed(credentials))
    in_flight = 0
    started = time.monotonic()
    deadline = started + timeout

    def open_next():
        nonlocal in_flight
        username, password = queue.pop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.connect_ex((host, port))
        state = {
            "packet": connect_packet(client_id=username, username=username, password=password, keepalive=240),
            "sent": 0,
            "buf": b"",
            "cred": (username, password),
        }
        selector.register(sock, selectors.EVENT_WRITE, state)
        in_flight += 1

    while (queue or in_flight) and time.monotonic() < deadline:
        while queue and in_flight < concurrency:
            open_next()
        for key, events in selector.select(timeout=0.5):
            sock, state = key.fileobj, key.data
            try:
                if events & selectors.EVENT_WRITE:
                    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if error:
                        raise ConnectionRefusedError(error)
                    state["sent"] += sock.send(state["packet"][state["sent"] :])
                    if state["sent"] == len(state["packet"]):
                        selector.modify(sock, selectors.EVENT_READ, state)
                    continue
                chunk = sock.recv(16)
                if not chunk:
                    raise ConnectionResetError("closed before CONNACK")
                state["buf"] += chunk
                if len(state["buf"]) < 4:
                    continue
                selector.unregister(sock)
                in_flight -= 1
                if state["buf"][0] == 0x20 and state["buf"][3] == 0:
                    result.ok += 1
                    result.sockets.append(sock)
                else:
                    result.refused += 1
                    sock.close()
            except (ConnectionRefusedError, ConnectionResetError, BrokenPipeError, OSError):
                selector.unregister(sock)
                sock.close()
                in_flight -= 1
                if retry_refused_connect:
                    queue.append(state["cred"])  # the listen backlog overflowed: try again
                else:
                    result.errors += 1
    result.elapsed = time.monotonic() - started
    selector.close()
    return result


def count_closed(sockets: list[socket.socket]) -> int:
    """How many of these connections the broker has closed (readable with EOF)."""
    closed = 0
    selector = selectors.DefaultSelector()
    for sock in sockets:
        selector.register(sock, selectors.EVENT_READ)
    for key, _ in selector.select(timeout=0.05):
        try:
            if key.fileobj.recv(1024, socket.MSG_PEEK) == b"":
                closed += 1
        except OSError:
            closed += 1
    selector.close()
    return closed


def close_all(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        try:
            sock.close()
        except OSError:
            pass
    sockets.clear()
