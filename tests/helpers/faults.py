"""Faults injected into the index path."""

from __future__ import annotations

import threading
import traceback
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy.engine.base import RootTransaction
from sqlalchemy.exc import OperationalError


def lose_connection_after_commit(monkeypatch: pytest.MonkeyPatch,
                                 where: Callable[[str], bool]) -> None:
    """The first COMMIT whose call stack satisfies *where* is applied, and then the client
    sees the connection fail: the commit's outcome is unknown to the caller."""
    original = RootTransaction.commit
    armed = threading.Event()
    armed.set()

    def commit_then_lose_connection(self: Any) -> None:
        original(self)
        if armed.is_set() and where("".join(traceback.format_stack())):
            armed.clear()
            raise OperationalError("COMMIT", {}, Exception("server closed the connection"))

    monkeypatch.setattr(RootTransaction, "commit", commit_then_lose_connection)
