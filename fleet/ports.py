"""Free ports for servers the project starts on 127.0.0.1 (tests, benchmarks, a local RabbitMQ cluster), and waiting
for one to listen. No Django import: the test settings use it before Django is configured."""

from __future__ import annotations

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


def free_port() -> int:
    """A free 127.0.0.1 port for a server a test starts, chosen *below* the kernel's ephemeral range.

    A port from the ephemeral range (what binding port 0 gives) is free only for the moment: the session keeps its
    broker ports for its whole length and restarts the broker on them test after test, and in between, any outgoing
    connection on the machine (another xdist worker's client, say) can be handed that very port as its source port;
    the broker then fails to start with "address in use". Ports under the range are never handed out that way."""
    low, _ = _ephemeral_range()
    floor = min(20_000, max(1024, low - 10_000))
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(floor, low)
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
