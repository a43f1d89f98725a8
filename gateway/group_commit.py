"""Group commit: units of work submitted from many threads share one transaction.

Every C-STORE is acknowledged only after its index row is committed, and a commit costs
a disk flush (SQLite's WAL ``fsync``, PostgreSQL's WAL flush and a round trip) whatever
it holds. With several associations sending at once, each waiting for its own flush,
the flushes queue one behind the other. Here the first thread to arrive becomes the
*leader*: it takes every unit waiting at that moment (its own included), runs them as
one batch, hands each submitter its own result, and returns. Threads arriving while a
batch is being committed wait; when the leader is done, the first of them leads the next
batch with all that queued up meanwhile. Nobody waits on a timer to fill a batch: with
one association the leader's batch is its own unit, the path as it was without group
commit, and batches grow only as far as commits actually overlap.

Durability is unchanged: :meth:`GroupCommit.submit` returns only after the batch holding
the unit was committed (or raises what the batch runner reported for it), so Success is
still answered only for committed rows.

The batch runner decides what a batch is (one transaction, how failures are isolated);
this module only does the hand-over between threads, and is tested without a database.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

W = TypeVar("W")
R = TypeVar("R")

BatchRunner = Callable[[Sequence[W]], Sequence["R | BaseException"]]
"""Runs a batch; returns, in order, each unit's result or the exception to raise for it."""


class _Unit(Generic[W, R]):
    __slots__ = ("done", "error", "event", "lead", "result", "work")

    def __init__(self, work: W) -> None:
        self.work = work
        self.event = threading.Event()
        self.lead = False
        self.done = False
        self.result: R | None = None
        self.error: BaseException | None = None


class GroupCommit(Generic[W, R]):
    """Runs units submitted concurrently in batches, one batch at a time."""

    def __init__(self, run_batch: BatchRunner[W, R], *, max_batch: int = 64,
                 on_batch: Callable[[int], None] | None = None) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._on_batch = on_batch
        self._lock = threading.Lock()
        self._pending: list[_Unit[W, R]] = []
        self._busy = False

    def submit(self, work: W) -> R:
        """Run *work* in the next batch; return its result once that batch is done."""
        unit: _Unit[W, R] = _Unit(work)
        with self._lock:
            self._pending.append(unit)
            if not self._busy:
                self._busy = True
                unit.lead = True
        if not unit.lead:
            unit.event.wait()
        if not unit.done:  # promoted: lead the next batch, which holds this unit
            self._lead()
        if unit.error is not None:
            raise unit.error
        return unit.result  # type: ignore[return-value]

    def _lead(self) -> None:
        with self._lock:
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
        try:
            self._answer(batch)
        finally:
            self._hand_over(batch)
        if self._on_batch is not None:
            with contextlib.suppress(Exception):  # a metric must not fail the submitter
                self._on_batch(len(batch))

    def _answer(self, batch: list[_Unit[W, R]]) -> None:
        try:
            outcomes = list(self._run_batch([u.work for u in batch]))
        except BaseException as exc:  # noqa: BLE001 - handed to every unit of the batch
            outcomes = [exc] * len(batch)
        if len(outcomes) != len(batch):
            outcomes = [RuntimeError("the batch runner returned a result count that "
                                     "differs")] * len(batch)
        for unit, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                unit.error = outcome
            else:
                unit.result = outcome
            unit.done = True

    def _hand_over(self, batch: list[_Unit[W, R]]) -> None:
        """Answer every unit of the batch and pass the lead on, whatever happened: a
        waiting submitter is never stranded."""
        for unit in batch:
            if not unit.done:
                unit.error = RuntimeError("the batch ended without an answer")
                unit.done = True
        with self._lock:
            if self._pending:
                successor = self._pending[0]
                successor.lead = True
                successor.event.set()
            else:
                self._busy = False
        for unit in batch:
            unit.event.set()
