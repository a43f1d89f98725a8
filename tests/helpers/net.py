"""Loopback networking helpers: free ports and bounded waits."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port that is free on loopback right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.05,
               message: str = "condition") -> None:
    """Poll *condition* until it holds; fail the test after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    if condition():
        return
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")


def port_open(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


def wait_for_port(port: int, timeout: float = 15.0, host: str = LOOPBACK) -> None:
    wait_until(lambda: port_open(port, host), timeout, message=f"{host}:{port} to listen")
