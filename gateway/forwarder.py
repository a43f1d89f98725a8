"""Forwarding: per-destination workers that deliver queued instances over C-STORE.

Each destination has its own workers (``max_associations`` of them), so a dead PACS
never delays the others. A worker claims a batch of one study's instances, sends them
over one association (streaming each file as stored when the destination accepts its
transfer syntax), and records every attempt. Outcomes are classified by
:mod:`gateway.status`; the retry schedule comes from :mod:`gateway.backoff`.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from pynetdicom import _config
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from gateway import dimse_codec, dimse_reactor, send_lane
from gateway.backoff import retry_delay
from gateway.config import DestinationConfig, MorphConfig
from gateway.dicom import skip_value_validation_on_read
from gateway.index import admin, queue
from gateway.index.database import describe_error, reading
from gateway.index.outbox import Outcome
from gateway.index.queue import ClaimedJob
from gateway.logs import failure_fields, get_logger
from gateway.metrics import Metrics
from gateway.objectstore import ObjectStore
from gateway.scu import AssociationFailedError, DestinationLink, SendResult
from gateway.spool import Spool
from gateway.status import StatusCategory
from gateway.transfer import fits

log = get_logger(__name__)

_LEASE = dt.timedelta(minutes=10)
_LEASE_RENEWAL_SECONDS = 60.0
_IDLE_POLL_SECONDS = 2.0
_GATHER_SECONDS = 0.1
_GATHER_MIN_SECONDS = 0.02  # the listener's wake-up interval
_RECORD_BATCH = 32  # successful sends recorded per transaction
_LINK_IDLE_SECONDS = 1.0  # an association with nothing more to send is released after this


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass
class DestinationState:
    """Shared by a destination's workers: wake-ups and the outage backoff."""

    config: DestinationConfig
    wake: threading.Event = field(default_factory=threading.Event)
    ended: threading.Condition = field(default_factory=threading.Condition)
    ended_count: int = 0
    """Associations whose instances were routed here that have ended: each time, what
    one brought is all in the index, and workers gathering more of a study claim."""
    consecutive_failures: int = 0
    paused_until: float = 0.0
    paused_by_operator: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def association_ended(self) -> None:
        with self.ended:
            self.ended_count += 1
            self.ended.notify_all()

    def failed(self) -> float:
        """Record a destination-level failure; return the pause before the next try.

        Workers failing together in one outage count once, not once each.
        """
        with self.lock:
            now = time.monotonic()
            if now < self.paused_until:
                return self.paused_until - now
            self.consecutive_failures += 1
            retry = self.config.retry
            delay = retry_delay(self.consecutive_failures, retry.initial_seconds, retry.max_seconds)
            self.paused_until = now + delay
            return delay

    def succeeded(self) -> bool:
        """Record a delivery; True when this ends an outage."""
        with self.lock:
            recovered = self.consecutive_failures > 0
            self.consecutive_failures = 0
            self.paused_until = 0.0
            return recovered


@dataclass
class _BatchSummary:
    """What one forward association did, for its log event."""

    association_id: str
    started: float
    sent: int = 0
    failed: int = 0
    untried: int = 0
    bytes: int = 0
    outcome: str = "completed"
    received_by: list[str] = field(default_factory=list)
    """The inbound associations the batch's instances came from."""


@dataclass(frozen=True)
class ForwardSettings:
    """What workers need besides the destination itself."""

    engine: Engine
    spool: Spool
    store: ObjectStore
    node_name: str
    calling_ae_title: str
    clock: Callable[[], dt.datetime] = _utcnow
    metrics: Metrics = field(default_factory=Metrics)


class DestinationWorker:
    """One association's worth of forwarding to one destination, in a loop."""

    def __init__(self, state: DestinationState, settings: ForwardSettings, index: int) -> None:
        self.state = state
        self.settings = settings
        self.destination = state.config
        self.owner = f"{settings.node_name}:{self.destination.name}:{index}:{uuid.uuid4().hex[:8]}"
        self._stopping = threading.Event()
        self._delivered: list[tuple[ClaimedJob, Outcome]] = []
        """Sent in the current association, not yet recorded."""
        self._link: DestinationLink | None = None
        """The association kept open between batches (closed when idle)."""
        self._link_association_id = ""
        self._link_used = 0.0
        self._caught_up = False
        self._ended_seen = 0
        self._thread = threading.Thread(
            target=self._run, name=f"forward-{self.destination.name}-{index}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self.state.wake.set()
        with self.state.ended:
            self.state.ended.notify_all()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            self._close_link()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            if self.state.paused_by_operator:
                self._close_link()
                self.state.wake.wait(1.0)
                self.state.wake.clear()
                continue
            pause = self.state.paused_until - time.monotonic()
            if pause > 0:
                self._stopping.wait(pause)
                continue
            if self._caught_up:
                # The last claim took all there was of a study still arriving: let more of
                # it gather, so that each claim and record transaction covers many.
                self._caught_up = False
                self._gather()
                continue
            try:
                self._ended_seen = self.state.ended_count  # this claim sees all of those
                jobs = self._claim()
                self._caught_up = 0 < len(jobs) < _RECORD_BATCH
            except SQLAlchemyError as exc:
                log.error("forward_queue_read_failed", destination=self.destination.name,
                          error=describe_error(exc))
                self._stopping.wait(2.0)
                continue
            if not jobs:
                if self._link is not None and (
                    time.monotonic() - self._link_used > _LINK_IDLE_SECONDS
                    or not self._link.established
                ):
                    self._close_link()
                if self.state.wake.wait(_LINK_IDLE_SECONDS if self._link else _IDLE_POLL_SECONDS):
                    # New work while idle: give the rest of the study a moment to arrive
                    # so that it goes out together, over one association.
                    self._gather()
                self.state.wake.clear()
                continue
            try:
                self._send_batch(jobs)
            except Exception as exc:  # noqa: BLE001 - logged (safely), counted as an attempt
                # A defect, not the destination: count it as a try so the backoff and
                # the dead-letter limit apply instead of a tight loop on the same study.
                log.error("forward_batch_internal_error", destination=self.destination.name,
                          **failure_fields(exc))
                self._fail_all(jobs, f"internal error ({type(exc).__name__}), see the log", "")

    def _gather(self) -> None:
        """Let more of a study still arriving gather before the next claim: for
        :data:`_GATHER_SECONDS`, or until an association routed here has ended since the
        last claim (all it brought is in the index: the study goes out now, not a gather
        later); at least :data:`_GATHER_MIN_SECONDS`, so that a sender opening an
        association per instance still gets claims covering several."""
        if self._stopping.wait(_GATHER_MIN_SECONDS):
            return
        state = self.state
        with state.ended:
            state.ended.wait_for(
                lambda: state.ended_count != self._ended_seen or self._stopping.is_set(),
                _GATHER_SECONDS - _GATHER_MIN_SECONDS)

    def _claim(self) -> list[ClaimedJob]:
        with self.settings.engine.begin() as connection:
            return queue.claim_batch(
                connection,
                self.destination.name,
                node=self.settings.node_name,
                owner=self.owner,
                now=self.settings.clock(),
                lease=_LEASE,
                limit=self.destination.batch_size,
            )

    # --- one batch -------------------------------------------------------------------

    def _fail_all(self, jobs: list[ClaimedJob], error: str, association_id: str) -> float:
        delay = self.state.failed()
        self.settings.metrics.forwards.labels(
            self.destination.name, StatusCategory.TRANSIENT_FAILURE.value).inc(len(jobs))
        for job in jobs:
            self._record_transient(job, None, error, association_id)
        return delay

    def _send_batch(self, jobs: list[ClaimedJob]) -> None:
        association_id = str(uuid.uuid4())
        started = time.monotonic()
        jobs = self._fitting(jobs)
        opened = self._link_for(jobs, association_id, started)
        if opened is None:
            return
        link, association_id = opened
        link.expect(jobs)
        if link.established and self.state.succeeded():
            log.info("destination_recovered", destination=self.destination.name)
        summary = _BatchSummary(association_id, started, received_by=_sources(jobs))
        remaining = list(jobs)
        renewed = time.monotonic()
        self._delivered = []
        try:
            while remaining:
                if self._stopping.is_set() or self.state.paused_by_operator:
                    summary.outcome = "stopped" if self._stopping.is_set() else "paused"
                    break
                job = remaining.pop(0)
                result = link.send(job, _route_morph(job))
                category = self._record_result(job, result, association_id)
                if category in (StatusCategory.SUCCESS, StatusCategory.WARNING):
                    summary.sent += 1
                    summary.bytes += result.bytes_sent
                else:
                    summary.failed += 1
                if category is StatusCategory.TRANSIENT_FAILURE:
                    summary.outcome = f"stopped early: {result.detail}"
                    self.state.failed()
                    break
                if time.monotonic() - renewed > _LEASE_RENEWAL_SECONDS:
                    self._extend([j.id for j in remaining])
                    renewed = time.monotonic()
        finally:
            self._flush_delivered(association_id)
            if remaining or summary.outcome != "completed":
                self._close_link()  # stopped, paused or failed: start afresh next time
            if remaining:
                self._release([job.id for job in remaining])
        summary.untried = len(remaining)
        self._link_used = time.monotonic()
        self._log_association(summary)

    def _link_for(
        self, jobs: list[ClaimedJob], association_id: str, started: float
    ) -> tuple[DestinationLink, str] | None:
        """The association to send *jobs* over (and its id): the previous batch's while it
        is open and negotiated all of them (a study arriving in pieces needs no new
        association per piece), else a new one. None when none could be opened (the jobs
        are recorded as transient failures)."""
        items = [(job.sop_class_uid, job.transfer_syntax_uid) for job in jobs]
        if self._link is not None and self._link.covers(items):
            return self._link, self._link_association_id
        self._close_link()
        link = DestinationLink(
            self.destination, self.settings.calling_ae_title, self.settings.spool,
            self.settings.store, self.settings.engine,
        )
        try:
            link.open(items)
        except AssociationFailedError as exc:
            delay = self._fail_all(jobs, str(exc), association_id)
            self._log_association(
                _BatchSummary(association_id, started, untried=len(jobs), outcome=str(exc),
                              received_by=_sources(jobs))
            )
            log.warning("destination_unavailable", destination=self.destination.name,
                        error=str(exc), retry_in_s=round(delay, 1))
            return None
        self._link, self._link_association_id = link, association_id
        return link, association_id

    def _close_link(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            try:
                link.close()
            except Exception as exc:  # noqa: BLE001 - a failed release ends it anyway
                log.warning("forward_release_failed", destination=self.destination.name,
                            **failure_fields(exc))

    def _fitting(self, jobs: list[ClaimedJob]) -> list[ClaimedJob]:
        """The longest prefix whose presentation contexts fit in one association."""
        decompress = self.destination.decompress
        count = len(jobs)
        while count > 1 and not fits(
            [(job.sop_class_uid, job.transfer_syntax_uid) for job in jobs[:count]],
            decompress=decompress,
        ):
            count -= 1
        if count < len(jobs):
            self._release([job.id for job in jobs[count:]])
        return jobs[:count]

    def _log_association(self, summary: _BatchSummary) -> None:
        log.info(
            "forward_association",
            destination=self.destination.name,
            forward_association_id=summary.association_id,
            received_association_ids=summary.received_by,
            instances=summary.sent,
            failed=summary.failed,
            untried=summary.untried,
            bytes=summary.bytes,
            duration_s=round(time.monotonic() - summary.started, 3),
            outcome=summary.outcome,
        )

    # --- outcomes --------------------------------------------------------------------

    def _record_result(
        self, job: ClaimedJob, result: SendResult, association_id: str
    ) -> StatusCategory:
        category = result.category
        self.settings.metrics.forwards.labels(self.destination.name, category.value).inc()
        if category is StatusCategory.SUCCESS:
            self._delivered_ok(job, Outcome("success", result.status, result.note),
                               association_id)
        elif category is StatusCategory.WARNING:
            warning = "; ".join(filter(None, [result.detail, result.note]))
            self._delivered_ok(job, Outcome("warning", result.status, warning), association_id)
        elif category is StatusCategory.TRANSIENT_FAILURE:
            self._record_transient(job, result.status, result.detail, association_id)
        else:
            self._dead_letter(job, result.status, result.detail, association_id)
        return category

    def _record_transient(
        self, job: ClaimedJob, status: int | None, error: str, association_id: str
    ) -> None:
        attempts = job.attempts + 1
        retry = self.destination.retry
        if attempts >= retry.max_attempts:
            reason = f"retries exhausted after {attempts} attempts; last error: {error}"
            self._dead_letter(job, status, reason, association_id)
            return
        delay = retry_delay(attempts, retry.initial_seconds, retry.max_seconds)
        next_at = self.settings.clock() + dt.timedelta(seconds=delay)
        self._record(job, Outcome("transient", status, error, next_at), association_id)

    def _dead_letter(
        self, job: ClaimedJob, status: int | None, reason: str, association_id: str
    ) -> None:
        # Reasons from a response already start with the described status.
        self._record(job, Outcome("permanent", status, reason, dead_reason=reason), association_id)
        self.settings.metrics.dead_letters.labels("forward", self.destination.name).inc()
        log.warning(
            "dead_letter",
            destination=self.destination.name,
            assoc_id=job.received_association_id,
            forward_association_id=association_id or None,
            job_id=job.id,
            study_instance_uid=job.study_instance_uid,
            sop_instance_uid=job.sop_instance_uid,
            status=f"0x{status:04X}" if status is not None else None,
            attempts=job.attempts + 1,
            reason=reason,
        )

    def _delivered_ok(self, job: ClaimedJob, outcome: Outcome, association_id: str) -> None:
        """Record a delivery, in a transaction with the next ones of the association.

        A crash before the record commits means the instance is sent again: the same
        SOP instance, so the destination keeps one copy.
        """
        self._delivered.append((job, outcome))
        if len(self._delivered) >= _RECORD_BATCH:
            self._flush_delivered(association_id)

    def _flush_delivered(self, association_id: str) -> None:
        delivered, self._delivered = self._delivered, []
        if not delivered:
            return
        now = self.settings.clock()
        results = [(job.id, job.attempts + 1, outcome) for job, outcome in delivered]
        try:
            with self.settings.engine.begin() as connection:
                lost = queue.record_outcomes(connection, results, owner=self.owner, now=now,
                                             forward_association_id=association_id)
        except SQLAlchemyError as exc:
            # The leases expire and the jobs are tried again: at worst duplicate sends.
            log.error("forward_record_failed", jobs=len(delivered), error=describe_error(exc))
            return
        for job_id in lost:
            log.warning("forward_lease_lost", job_id=job_id, destination=self.destination.name)

    def _record(self, job: ClaimedJob, outcome: Outcome, association_id: str) -> None:
        now = self.settings.clock()
        try:
            with self.settings.engine.begin() as connection:
                kept = queue.record_outcome(
                    connection,
                    job.id,
                    owner=self.owner,
                    attempts=job.attempts + 1,
                    result=outcome,
                    now=now,
                    forward_association_id=association_id,
                )
        except SQLAlchemyError as exc:
            # The lease expires and the job is tried again: at worst a duplicate send.
            log.error("forward_record_failed", job_id=job.id, error=describe_error(exc))
            return
        if not kept:
            log.warning("forward_lease_lost", job_id=job.id, destination=self.destination.name)

    def _release(self, ids: list[int]) -> None:
        try:
            with self.settings.engine.begin() as connection:
                queue.release(connection, ids, self.owner, self.settings.clock())
        except SQLAlchemyError as exc:
            log.error("forward_release_failed", error=describe_error(exc))

    def _extend(self, ids: list[int]) -> None:
        try:
            with self.settings.engine.begin() as connection:
                queue.extend_leases(connection, ids, self.owner, self.settings.clock() + _LEASE)
        except SQLAlchemyError as exc:
            log.error("forward_lease_renewal_failed", error=describe_error(exc))


def _sources(jobs: list[ClaimedJob]) -> list[str]:
    return sorted({job.received_association_id for job in jobs if job.received_association_id})


def _route_morph(job: ClaimedJob) -> MorphConfig | None:
    return MorphConfig.model_validate_json(job.route_morph) if job.route_morph else None


class Forwarder:
    """All destinations' workers."""

    def __init__(self, destinations: list[DestinationConfig], settings: ForwardSettings) -> None:
        self.settings = settings
        self.states = {dest.name: DestinationState(dest) for dest in destinations}
        self.workers = [
            worker for state in self.states.values() for worker in self._workers_for(state)
        ]
        self._reconfigure_lock = threading.Lock()

    def _workers_for(self, state: DestinationState) -> list[DestinationWorker]:
        return [DestinationWorker(state, self.settings, index)
                for index in range(state.config.max_associations)]

    def start(self) -> None:
        _config.STORE_SEND_CHUNKED_DATASET = True  # stream files as stored
        # pynetdicom's standard handlers format every PDU (and identifiers) for its log.
        _config.LOG_HANDLER_LEVEL = "none"
        dimse_reactor.install()  # no Nagle stalls or polling delays per instance sent
        dimse_codec.install()  # C-STORE-RQ command sets without pydicom datasets
        send_lane.install()  # C-STOREs of stored bytes without pynetdicom's machinery
        skip_value_validation_on_read()  # no regular expression per UID per message
        now = self.settings.clock()
        with self.settings.engine.begin() as connection:
            released = queue.release_node_leases(connection, self.settings.node_name, now)
            orphaned = queue.dead_letter_unconfigured(connection, list(self.states), now)
        if released:
            log.info("forward_jobs_recovered", jobs=released)
        if orphaned:
            log.warning("forward_jobs_for_unknown_destinations", jobs=orphaned)
        self.refresh_paused()
        for worker in self.workers:
            worker.start()

    def reconfigure(self, destinations: list[DestinationConfig]) -> None:
        """Apply a reloaded configuration: workers of removed or changed destinations
        finish their current instance and stop; new and changed ones start. Jobs of
        removed destinations become dead letters, visible and requeueable."""
        with self._reconfigure_lock:
            wanted = {dest.name: dest for dest in destinations}
            leaving = [name for name, state in self.states.items()
                       if wanted.get(name) != state.config]
            stopping = [w for w in self.workers if w.destination.name in leaving]
            for worker in stopping:
                worker.stop()
            deadline = time.monotonic() + 30.0
            for worker in stopping:
                worker.join(max(0.0, deadline - time.monotonic()))
            states = {name: state for name, state in self.states.items()
                      if name not in leaving}
            workers = [w for w in self.workers if w.destination.name not in leaving]
            starting: list[DestinationWorker] = []
            for name, config in wanted.items():
                if name not in states:
                    states[name] = DestinationState(config)
                    starting.extend(self._workers_for(states[name]))
            self.states, self.workers = states, workers + starting
            now = self.settings.clock()
            with self.settings.engine.begin() as connection:
                orphaned = queue.dead_letter_unconfigured(connection, list(states), now)
            if orphaned:
                log.warning("forward_jobs_for_unknown_destinations", jobs=orphaned)
            self.refresh_paused()
            for worker in starting:
                worker.start()
            if leaving or starting:
                log.info("destinations_reconfigured", stopped=sorted(leaving),
                         started=sorted({w.destination.name for w in starting}))

    def refresh_paused(self) -> None:
        """Apply the operators' pause/resume decisions (shared by all nodes)."""
        with reading(self.settings.engine) as connection:
            paused = admin.paused_destinations(connection)
        for name, state in self.states.items():
            if state.paused_by_operator != (name in paused):
                state.paused_by_operator = name in paused
                log.info("destination_paused" if name in paused else "destination_resumed",
                         destination=name)
                state.wake.set()

    def settle(self, destinations: Collection[str]) -> None:
        """An association whose instances were routed to *destinations* has ended: their
        workers gathering more of a study claim now."""
        for name, state in self.states.items():
            if name in destinations:
                state.association_ended()

    def wake(self, destinations: Collection[str] | None = None) -> None:
        """New work: wake the named destinations' workers (all when None)."""
        for name, state in self.states.items():
            if destinations is None or name in destinations:
                state.wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        for worker in self.workers:
            worker.stop()
        deadline = time.monotonic() + timeout
        for worker in self.workers:
            worker.join(max(0.0, deadline - time.monotonic()))
