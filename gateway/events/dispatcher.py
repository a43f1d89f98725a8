"""Event delivery: one worker per sink, draining the event outbox with retries.

Like forwarding: deliveries are claimed under a lease, a transient failure schedules a
retry with exponential backoff and jitter (and pauses that sink for the same time), a
permanent failure or exhausted retries make a dead letter with the reason, and every
outcome is recorded on the delivery.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid
from collections.abc import Callable

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from gateway.backoff import retry_delay
from gateway.config import ForwardRetryConfig
from gateway.events.sinks import PermanentDeliveryError, Sink, TransientDeliveryError
from gateway.index import events, outbox
from gateway.index.database import describe_error
from gateway.index.events import ClaimedDelivery
from gateway.index.outbox import Outcome
from gateway.logs import failure_fields, get_logger
from gateway.metrics import Metrics

log = get_logger(__name__)

_LEASE = dt.timedelta(minutes=5)
_LEASE_RENEWAL_SECONDS = 60.0
_BATCH = 20
_IDLE_POLL_SECONDS = 2.0


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class SinkWorker:
    def __init__(
        self, sink: Sink, retry: ForwardRetryConfig, engine: Engine, node_name: str, *,
        clock: Callable[[], dt.datetime] = _utcnow, metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics or Metrics()
        self.sink = sink
        self.retry = retry
        self.engine = engine
        self.clock = clock
        self.owner = f"{node_name}:sink:{sink.name}:{uuid.uuid4().hex[:8]}"
        self.wake = threading.Event()
        self._stopping = threading.Event()
        self._failures = 0
        self._paused_until = 0.0
        self._thread = threading.Thread(target=self._run, name=f"sink-{sink.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self.wake.set()
        self._thread.join(15)
        self.sink.close()

    def _run(self) -> None:
        while not self._stopping.is_set():
            pause = self._paused_until - time.monotonic()
            if pause > 0:
                self._stopping.wait(pause)
                continue
            try:
                with self.engine.begin() as connection:
                    claim = events.claim_deliveries(
                        connection, self.sink.name, owner=self.owner, now=self.clock(),
                        lease=_LEASE, limit=_BATCH,
                    )
            except SQLAlchemyError as exc:
                log.error("event_queue_read_failed", sink=self.sink.name,
                          error=describe_error(exc))
                self._stopping.wait(2.0)
                continue
            if claim.superseded:
                log.info("event_deliveries_superseded", sink=self.sink.name,
                         deliveries=claim.superseded,
                         reason="a newer revision of the same resource is queued")
                self.metrics.event_deliveries.labels(self.sink.name, "superseded").inc(
                    claim.superseded)
            claimed = claim.deliveries
            if not claimed:
                self.wake.wait(_IDLE_POLL_SECONDS)
                self.wake.clear()
                continue
            self._deliver_all(claimed)

    def _deliver_all(self, claimed: list[ClaimedDelivery]) -> None:
        renewed = time.monotonic()
        for index, delivery in enumerate(claimed):
            if self._stopping.is_set() or not self._deliver(delivery):
                self._release([d.id for d in claimed[index + 1:]])
                return
            if time.monotonic() - renewed > _LEASE_RENEWAL_SECONDS:
                self._extend([d.id for d in claimed[index + 1:]])
                renewed = time.monotonic()

    def _deliver(self, delivery: ClaimedDelivery) -> bool:
        """Deliver one event; False when the sink should pause."""
        attempts = delivery.attempts + 1
        try:
            self.sink.deliver(delivery)
        except TransientDeliveryError as exc:
            self._failures += 1
            pause = retry_delay(self._failures, self.retry.initial_seconds, self.retry.max_seconds)
            self._paused_until = time.monotonic() + pause
            if attempts >= self.retry.max_attempts:
                reason = f"retries exhausted after {attempts} attempts; last error: {exc.full()}"
                self._record(delivery, attempts, Outcome("permanent", error=exc.full(),
                                                         dead_reason=reason))
                self._log_dead(delivery, f"retries exhausted; last error: {exc}")
            else:
                delay = retry_delay(attempts, self.retry.initial_seconds, self.retry.max_seconds)
                next_at = self.clock() + dt.timedelta(seconds=delay)
                self._record(delivery, attempts, Outcome("transient", error=exc.full(),
                                                         next_attempt_at=next_at))
                level = log.warning if self._failures <= 3 else log.debug
                level("event_delivery_failed", sink=self.sink.name, event_id=delivery.event_id,
                      study_instance_uid=delivery.study_instance_uid,
                      error=str(exc)[:300], retry_in_s=round(delay, 2))
            return False
        except PermanentDeliveryError as exc:
            self._record(delivery, attempts, Outcome("permanent", error=exc.full(),
                                                     dead_reason=exc.full()))
            self._log_dead(delivery, str(exc))
            return True
        except Exception as exc:  # noqa: BLE001 - logged (safely) and dead-lettered
            log.error("event_delivery_internal_error", sink=self.sink.name,
                      **failure_fields(exc))
            reason = f"internal error ({type(exc).__name__}), see the log"
            self._record(delivery, attempts, Outcome("permanent", error=reason,
                                                     dead_reason=reason))
            return True
        if self._failures:
            log.info("event_sink_recovered", sink=self.sink.name)
        self._failures = 0
        self._record(delivery, attempts, Outcome("success"))
        log.debug("event_delivered", sink=self.sink.name, event_id=delivery.event_id,
                  kind=delivery.kind, study_instance_uid=delivery.study_instance_uid,
                  version=delivery.version)
        return True

    def _log_dead(self, delivery: ClaimedDelivery, reason: str) -> None:
        log.warning("event_dead_letter", sink=self.sink.name, event_id=delivery.event_id,
                    kind=delivery.kind, study_instance_uid=delivery.study_instance_uid,
                    version=delivery.version, reason=reason[:300])

    def _record(self, delivery: ClaimedDelivery, attempts: int, result: Outcome) -> None:
        self.metrics.event_deliveries.labels(self.sink.name, result.outcome).inc()
        if result.dead_reason is not None:
            self.metrics.dead_letters.labels("event", self.sink.name).inc()
        try:
            with self.engine.begin() as connection:
                kept = outbox.record(connection, events.delivery_table, delivery.id,
                                     owner=self.owner, attempts=attempts, result=result,
                                     now=self.clock())
        except SQLAlchemyError as exc:
            log.error("event_record_failed", sink=self.sink.name, error=describe_error(exc))
            return
        if not kept:
            log.warning("event_lease_lost", sink=self.sink.name, event_id=delivery.event_id)

    def _extend(self, ids: list[int]) -> None:
        try:
            with self.engine.begin() as connection:
                outbox.extend_leases(connection, events.delivery_table, ids, self.owner,
                                     self.clock() + _LEASE)
        except SQLAlchemyError as exc:
            log.error("event_lease_renewal_failed", error=describe_error(exc))

    def _release(self, ids: list[int]) -> None:
        if not ids:
            return
        try:
            with self.engine.begin() as connection:
                outbox.release(connection, events.delivery_table, ids, self.owner, self.clock())
        except SQLAlchemyError as exc:
            log.error("event_release_failed", sink=self.sink.name, error=describe_error(exc))


class EventDispatcher:
    """All sinks' workers."""

    def __init__(self, workers: list[SinkWorker], engine: Engine, node_name: str) -> None:
        self.workers = workers
        self.engine = engine
        self.node_name = node_name

    def start(self) -> None:
        now = _utcnow()
        with self.engine.begin() as connection:
            outbox.release_node_leases(connection, events.delivery_table, self.node_name, now)
            dropped = events.dead_letter_unconfigured(
                connection, [worker.sink.name for worker in self.workers], now
            )
        if dropped:
            log.warning("event_deliveries_for_unknown_sinks", deliveries=dropped)
        for worker in self.workers:
            worker.start()

    def wake(self) -> None:
        for worker in self.workers:
            worker.wake.set()

    def reconfigure(self, leaving: set[str], starting: list[SinkWorker]) -> None:
        """Apply a reloaded configuration: stop the workers of sinks that were removed
        or changed, start *starting*. Deliveries to removed sinks become dead letters."""
        stopping = [worker for worker in self.workers if worker.sink.name in leaving]
        for worker in stopping:
            worker.stop()
        self.workers = [w for w in self.workers if w.sink.name not in leaving] + starting
        with self.engine.begin() as connection:
            dropped = events.dead_letter_unconfigured(
                connection, [worker.sink.name for worker in self.workers], _utcnow()
            )
        if dropped:
            log.warning("event_deliveries_for_unknown_sinks", deliveries=dropped)
        for worker in starting:
            worker.start()

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()
