"""Loopback networking helpers: free ports and bounded waits."""

from __future__ import annotations

import os
import random
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

LOOPBACK = "127.0.0.1"


def _worker_range() -> range:
    # Each pytest-xdist worker draws from its own range, below the kernel's ephemeral
    # ports: a port one test leaves "down" on purpose is never another test's server.
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    index = int(worker) if worker.isdigit() else 0
    start = 20000 + (index % 8) * 1500
    return range(start, start + 1500)


def free_port() -> int:
    """A TCP port that is free on loopback right now."""
    ports = _worker_range()
    for _ in range(200):
        port = random.choice(ports)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((LOOPBACK, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in this worker's range")


@contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections for the whole block: bound, never
    listening, so no server can take it meanwhile (a port merely free when picked can
    be taken by the time a test connects to it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        yield int(sock.getsockname()[1])


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
