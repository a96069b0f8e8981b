"""Local servers: a free port to listen on, and waiting until a server answers."""

from __future__ import annotations

import socket
import time


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the system picks it; another process may still take it)."""
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
