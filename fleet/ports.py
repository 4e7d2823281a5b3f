"""Free ports for servers the project starts on 127.0.0.1 (tests, benchmarks, a local RabbitMQ cluster), and waiting
for one to listen. No Django import: the test settings use it before Django is configured."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import time
from contextlib import closing
from pathlib import Path


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def _slice(floor: int, ceiling: int) -> tuple[int, int]:
    """FLEET_PORT_SLICE="<index>/<count>" (the test settings set it per pytest-xdist worker): this process picks
    ports only from its own part of the range, so that no worker takes a port another one keeps for its broker
    while that broker is stopped between tests."""
    try:
        index, count = (int(part) for part in os.environ.get("FLEET_PORT_SLICE", "0/1").split("/"))
    except ValueError:
        index, count = 0, 1
    if count <= 1 or not 0 <= index < count:
        return floor, ceiling
    width = (ceiling - floor) // count
    return floor + index * width, floor + (index + 1) * width


def _reserved() -> set[int]:
    """FLEET_RESERVED_PORTS: ports this process keeps for a server it stops and starts again (a test session's
    broker), which free_port must not hand to anything else."""
    return {int(p) for p in os.environ.get("FLEET_RESERVED_PORTS", "").split(",") if p.strip().isdigit()}


def reserve(*ports: int) -> None:
    """Add ports to FLEET_RESERVED_PORTS (inherited by child processes)."""
    os.environ["FLEET_RESERVED_PORTS"] = ",".join(str(p) for p in sorted(_reserved() | set(ports)))


def free_port() -> int:
    """A free 127.0.0.1 port for a server a test starts, chosen *below* the kernel's ephemeral range.

    A port from the ephemeral range (what binding port 0 gives) is free only for the moment: the session keeps its
    broker ports for its whole length and restarts the broker on them test after test, and in between, any outgoing
    connection on the machine (another xdist worker's client, say) can be handed that very port as its source port;
    the broker then fails to start with "address in use". Ports under the range are never handed out that way."""
    low, _ = _ephemeral_range()
    floor = min(20_000, max(1024, low - 10_000))
    floor, low = _slice(floor, low)
    reserved = _reserved()
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(floor, low)
        if port in reserved:
            continue
        with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port found between {floor} and {low} on 127.0.0.1")


def wait_for_port(port: int, timeout: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")
