"""Moves spooled instances to the object store, verifies them, then frees the spool.

The index is the outbox: every ``spooled`` row of this node is an upload to do. The
spool file is deleted only after the object store holds a verified copy *and* the row
records its key, so a crash at any point leaves either the spool file or the object. An
instance spooled in the index has its bytes deleted in the transaction that records it
as stored. While the store is unavailable, instances wait in the spool; receiving is
unaffected.

Uploads yield to receiving: while instances keep arriving they wait (durable in the
spool) until arrivals pause, but never longer than ``storage.upload_yield_seconds``
(:func:`upload_hold`). Writing the objects is disk and CPU work that competes with the
associations being served; a burst is received first and uploaded right after it, and
under sustained traffic uploads run alongside, that long behind.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from gateway.backoff import retry_delay
from gateway.config import RetryConfig
from gateway.index import repository
from gateway.index.database import describe_error, reading
from gateway.logs import failure_fields, get_logger
from gateway.metrics import Metrics
from gateway.objectstore import (
    ExpectedContent,
    ObjectStore,
    ObjectStoreError,
    ObjectVerificationError,
    Upload,
    object_key,
)
from gateway.spool import Spool, content_path

log = get_logger(__name__)

_IDLE_POLL_SECONDS = 1.0
_BATCH = 128  # instances a worker uploads before recording them in one transaction
_GATHER_SECONDS = 0.25
QUIET_SECONDS = 0.5
"""No instance stored for this long: arrivals have paused, uploads go ahead."""


_PART_BYTES = 32 * 1024 * 1024
"""Bytes spooled in the index read (and held in memory) at a time by an upload worker."""


def _parts(rows: list[Any], limit: int) -> list[list[Any]]:
    """*rows* in order, cut where the bytes spooled in the index would pass *limit*."""
    parts: list[list[Any]] = [[]]
    held = 0
    for row in rows:
        size = int(row.size) if row.spool_name is None else 0
        if parts[-1] and held + size > limit:
            parts.append([])
            held = 0
        parts[-1].append(row)
        held += size
    return parts


def upload_hold(
    now: float, last_arrival: float | None, arrivals_since: float | None,
    yield_seconds: float, quiet_seconds: float = QUIET_SECONDS,
) -> float:
    """How long uploads still wait for arrivals to pause (0: upload now).

    *last_arrival* is when an instance was last stored, *arrivals_since* when the
    instances arriving since the uploader last caught up began to arrive (None: none
    since); times in seconds on one monotonic clock.
    """
    if yield_seconds <= 0 or last_arrival is None or arrivals_since is None:
        return 0.0
    until_quiet = quiet_seconds - (now - last_arrival)
    until_due = yield_seconds - (now - arrivals_since)
    if until_quiet <= 0 or until_due <= 0:
        return 0.0
    return min(until_quiet, until_due)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Uploader:
    """Background upload of this node's spooled instances, with backoff during outages."""

    def __init__(
        self,
        engine: Engine,
        spool: Spool,
        store: ObjectStore,
        node_name: str,
        *,
        workers: int,
        retry: RetryConfig,
        yield_seconds: float = 0.0,
        clock: Callable[[], dt.datetime] = _utcnow,
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics or Metrics()
        self.engine = engine
        self.spool = spool
        self.store = store
        self.node_name = node_name
        self.workers = workers
        self.retry = retry
        self.clock = clock
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._in_flight: set[int] = set()
        self._batches = 0
        self._backlog = False
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="upload")
        self._thread = threading.Thread(target=self._run, name="uploader", daemon=True)
        self._outage_failures = 0
        self._paused_until = 0.0
        self.yield_seconds = yield_seconds
        self._last_arrival: float | None = None
        self._arrivals_since: float | None = None
        self.uploaded = 0

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """Tell the uploader there is new work (called after instances were stored)."""
        now = time.monotonic()
        with self._lock:
            self._last_arrival = now
            if self._arrivals_since is None:
                self._arrivals_since = now
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish uploads in progress (bounded by the store's timeouts) and stop."""
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def idle(self) -> bool:
        with self._lock:
            return not self._in_flight

    # --- loop --------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            pause = self._paused_until - time.monotonic()
            if pause > 0:
                self._stopping.wait(pause)
                continue
            with self._lock:
                hold = upload_hold(time.monotonic(), self._last_arrival, self._arrivals_since,
                                   self.yield_seconds)
            if hold > 0:
                self._stopping.wait(hold)
                continue
            claimed = self._claim()
            self._wake.wait(_IDLE_POLL_SECONDS if not claimed else 0.2)
            self._wake.clear()
            if not self._backlog:
                # Caught up: let newly received instances gather into one batch (one
                # transaction) rather than upload each as it lands, competing with the
                # receive path for the database and the interpreter. They are durable in
                # the spool meanwhile.
                self._stopping.wait(_GATHER_SECONDS)

    def _claim(self) -> int:
        with self._lock:
            idle_workers = self.workers - self._batches
            exclude = list(self._in_flight)
        if idle_workers <= 0:
            return 0  # every worker has a batch; what arrives meanwhile makes the next one
        try:
            with reading(self.engine) as connection:
                rows = repository.due_uploads(
                    connection, self.node_name, self.clock(), idle_workers * _BATCH, exclude
                )
        except SQLAlchemyError as exc:
            log.error("upload_queue_read_failed", error=describe_error(exc))
            self._stopping.wait(1.0)
            return 0
        self._backlog = len(rows) == idle_workers * _BATCH
        if not rows:
            with self._lock:
                if not self._in_flight:
                    self._arrivals_since = None  # caught up: the next arrival waits anew
            return 0
        # Spread the rows over the idle workers; each records its batch in one transaction.
        size = -(-len(rows) // idle_workers)
        batches = [list(rows[start:start + size]) for start in range(0, len(rows), size)]
        with self._lock:
            self._in_flight.update(row.id for row in rows)
            self._batches += len(batches)
        for batch in batches:
            self._pool.submit(self._upload_batch, batch)
        return len(rows)

    # --- one batch -----------------------------------------------------------------------

    def _upload_batch(self, rows: list[Any]) -> None:
        try:
            uploaded: list[tuple[Any, str]] = []
            for part in _parts(rows, _PART_BYTES):
                if self._stopping.is_set() or time.monotonic() < self._paused_until:
                    break  # the rest stays spooled and is claimed again later
                try:
                    contents = self._contents(part)
                except SQLAlchemyError as exc:  # the rows stay spooled and are claimed again
                    log.error("upload_queue_read_failed", error=describe_error(exc))
                    break
                uploaded += self._upload_part(part, contents)
            self._mark_stored(uploaded)
        except Exception as exc:  # noqa: BLE001 - the rows stay spooled and are retried
            log.error("upload_internal_error", **failure_fields(exc))
        finally:
            with self._lock:
                self._in_flight.difference_update(row.id for row in rows)
                self._batches -= 1
            self._wake.set()

    def _upload_part(self, rows: list[Any], contents: dict[int, bytes]) -> list[tuple[Any, str]]:
        with contextlib.ExitStack() as held:
            uploads = []
            for row in rows:
                if self._stopping.is_set() or time.monotonic() < self._paused_until:
                    break  # the rest stays spooled and is claimed again later
                path = self._source(row, contents.get(row.id), held)
                if path is not None:
                    uploads.append((row, Upload(self._key(row), path, ExpectedContent(
                        row.size, row.dataset_offset, row.sha256))))
            return self._put(uploads)

    def _contents(self, rows: list[Any]) -> dict[int, bytes]:
        """The bytes of the rows spooled in the index, by primary key."""
        in_index = [row.id for row in rows if row.spool_name is None]
        if not in_index:
            return {}
        with reading(self.engine) as connection:
            return repository.spooled_contents(connection, in_index)

    @staticmethod
    def _key(row: Any) -> str:
        return object_key(row.study_instance_uid, row.series_instance_uid,
                          row.sop_instance_uid, row.sha256)

    def _source(self, row: Any, content: bytes | None, held: contextlib.ExitStack) -> Path | None:
        """A path to read a spooled instance from while *held* lasts; None (and the
        failure recorded) when its bytes are missing."""
        if row.spool_name is None:
            if content is None:
                log.critical("spooled_content_missing", instance_pk=row.id,
                             sop_instance_uid=row.sop_instance_uid)
                self._record_failure(row, "its bytes are missing from the index")
                return None
            return held.enter_context(content_path(content))
        path = self.spool.path(row.spool_name)
        if not path.exists():
            log.critical(
                "spool_file_missing", instance_pk=row.id, sop_instance_uid=row.sop_instance_uid
            )
            self._record_failure(row, f"spool file {row.spool_name} is missing")
            return None
        return path

    def _put(self, uploads: list[tuple[Any, Upload]]) -> list[tuple[Any, str]]:
        """Copy spooled instances to the store; those stored, with their object keys."""
        if not uploads:
            return []
        try:
            outcomes = self.store.put_files([upload for _, upload in uploads])
        except Exception as exc:  # noqa: BLE001 - logged (safely) and retried with backoff
            log.error("upload_internal_error", **failure_fields(exc))
            for row, _ in uploads:
                self._record_failure(row, "internal error (see log)")
            return []
        stored = []
        store_failed = False
        for (row, upload), error in zip(uploads, outcomes, strict=True):
            if error is None:
                stored.append((row, upload.key))
            elif isinstance(error, ObjectVerificationError):
                # This object's bytes, not the store, are the problem: retry it alone.
                log.error("upload_verification_failed", instance_pk=row.id,
                          error=str(error)[:300])
                self._record_failure(row, str(error))
            elif not store_failed:
                # The store itself: back off; the rest of the batch stays spooled.
                self._on_store_failure(row, error)
                store_failed = True
        return stored

    def _mark_stored(self, uploaded: list[tuple[Any, str]]) -> None:
        """Record a batch of stored objects in one transaction, then free their spool files."""
        if not uploaded:
            return
        now = self.clock()
        try:
            with self.engine.begin() as connection:
                marked = repository.mark_stored_many(
                    connection, [(row.id, key) for row, key in uploaded], now)
            stored = [(row, key) for row, key in uploaded if row.id in marked]
        except SQLAlchemyError as exc:
            # The objects are stored; the rows stay spooled and the (idempotent) uploads
            # are repeated later. The spool files are kept until the rows say otherwise.
            log.error("upload_record_failed", error=describe_error(exc))
            return
        for row, key in stored:
            if row.spool_name is not None:
                self.spool.discard(row.spool_name)
            self.metrics.uploads.labels("stored").inc()
            log.debug("instance_uploaded", sop_instance_uid=row.sop_instance_uid, object_key=key)
        with self._lock:
            self.uploaded += len(stored)
            recovered, self._outage_failures = self._outage_failures > 0, 0
        if recovered:
            log.info("object_store_recovered", store=self.store.description)

    def _on_store_failure(self, row: Any, exc: ObjectStoreError) -> None:
        with self._lock:
            self._outage_failures += 1
            failures = self._outage_failures
            delay = retry_delay(failures, self.retry.initial_seconds, self.retry.max_seconds)
            self._paused_until = time.monotonic() + delay
        level = log.warning if failures <= 3 else log.debug
        level(
            "upload_failed",
            store=self.store.description,
            error=str(exc)[:300],
            consecutive_failures=failures,
            retry_in_s=round(delay, 2),
        )
        self._record_failure(row, str(exc), delay)

    def _record_failure(self, row: Any, error: str, delay: float | None = None) -> None:
        self.metrics.uploads.labels("failed").inc()
        attempts = int(row.upload_attempts) + 1
        if delay is None:
            delay = retry_delay(attempts, self.retry.initial_seconds, self.retry.max_seconds)
        next_at = self.clock() + dt.timedelta(seconds=delay)
        try:
            with self.engine.begin() as connection:
                repository.mark_upload_failed(connection, row.id, attempts, next_at, error)
        except SQLAlchemyError as exc:
            log.error("upload_record_failed", error=describe_error(exc))
