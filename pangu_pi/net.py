"""Local servers: a free port to listen on, and waiting until a server answers."""

from __future__ import annotations

import random
import socket
import time


def _ephemeral_range() -> tuple[int, int]:
    try:
        from pathlib import Path

        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now, taken below the system's ephemeral range: the kernel
    hands ports of that range to every outgoing connection, so a port picked there (as binding port 0
    does) is often gone by the time a server or a process group binds it on a busy machine. Another
    process may still take it; the chance is small, not zero."""
    low, _ = _ephemeral_range()
    rng = random.SystemRandom()
    for _ in range(64):
        port = rng.randrange(20000, low) if low > 20001 else 0
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return s.getsockname()[1]
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def answers(url: str, timeout: float = 2.0) -> bool:
    """Whether a GET of `url` is answered 200 now (refused, timed out or any other status: False)."""
    import httpx

    try:
        return httpx.get(url, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def wait_until_ready(url: str, timeout: float, *, process=None, interval: float = 1.0) -> bool:
    """Poll `url` until it answers 200 (True), or until `process` (a Popen) exits or `timeout` seconds
    pass (False; the caller knows which from `process.poll()` and says so in its own words)."""
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            return False
        if answers(url):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
