"""Stable-study detection: raises each study's events once per change.

Every few seconds the watcher looks for studies with no new instance for
``[events] stable_seconds`` whose latest change has no event yet. For each, one
transaction takes the next event version (only one process can), links the study to
its HL7 order, builds the events and writes them with a delivery per sink.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable

from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError

from gateway.events.builder import EventTargets, OrderFacts, build_events
from gateway.hl7.messages import PatientInfo
from gateway.index import events, orders
from gateway.index.database import describe_error, reading
from gateway.logs import failure_fields, get_logger
from gateway.metrics import Metrics

log = get_logger(__name__)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class StudyWatcher:
    def __init__(
        self,
        engine: Engine,
        targets: EventTargets,
        *,
        stable_seconds: float,
        check_seconds: float,
        on_events: Callable[[], None],
        clock: Callable[[], dt.datetime] = _utcnow,
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics or Metrics()
        self.engine = engine
        self.targets = targets
        self.stable = dt.timedelta(seconds=stable_seconds)
        self.check_seconds = check_seconds
        self.on_events = on_events
        self.clock = clock
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="study-watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def reconfigure(self, targets: EventTargets, stable_seconds: float,
                    check_seconds: float) -> None:
        """Use a reloaded configuration for studies that become due from now on."""
        self.targets = targets
        self.stable = dt.timedelta(seconds=stable_seconds)
        self.check_seconds = check_seconds

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stopping.wait(self.check_seconds):
            try:
                self.check()
            except SQLAlchemyError as exc:
                log.error("study_watch_failed", error=describe_error(exc))

    def check(self) -> int:
        """Raise the events of every study that is due now; returns how many."""
        cutoff = self.clock() - self.stable
        with reading(self.engine) as connection:
            due = events.due_studies(connection, cutoff)
        raised = 0
        for study_pk in due:
            try:
                raised += self._raise(study_pk, cutoff)
            except SQLAlchemyError:
                raise
            except Exception as exc:  # noqa: BLE001 - recorded on the study and logged
                # One study whose data cannot be mapped must not hold up the others.
                self._failed(study_pk, exc)
        if raised:
            self.on_events()
        return raised

    def _failed(self, study_pk: int, exc: Exception) -> None:
        fields = failure_fields(exc)
        log.error("study_event_failed", study_pk=study_pk, **fields)
        reason = f"{fields['error_type']} at {fields['where']}"
        with self.engine.begin() as connection:
            claim_seq = events.current_change(connection, study_pk)
            events.record_event_failure(connection, study_pk, claim_seq, reason, self.clock())

    def _raise(self, study_pk: int, cutoff: dt.datetime) -> bool:
        now = self.clock()
        with self.engine.begin() as connection:
            claim = events.claim_study_event(connection, study_pk, cutoff, now)
            if claim is None:
                return False
            reconciled = orders.reconcile_study(connection, study_pk)
            study = events.load_study(connection, study_pk)
            order = _order_facts(connection, study.order_pk)
            announced = events.announced_documents(connection, study_pk)
            new = build_events(study, version=claim.version, announced=announced,
                               targets=self.targets, order=order, now=now)
            events.insert_events(connection, study_pk, study.summary.study_instance_uid,
                                 version=claim.version, events=new, now=now)
        self.metrics.study_events.inc()
        if reconciled and reconciled.newly_flagged:
            self.metrics.demographics_mismatches.inc()
        if reconciled and reconciled.mismatched:
            log.warning("order_demographics_mismatch",
                        study_instance_uid=study.summary.study_instance_uid,
                        attributes=reconciled.mismatched)
        log.info("study_event", study_instance_uid=study.summary.study_instance_uid,
                 version=claim.version, events=[event.kind for event in new],
                 order_matched=study.order_pk is not None)
        return True


def _order_facts(connection: object, order_pk: int | None) -> OrderFacts:
    if order_pk is None:
        return OrderFacts()
    o = orders.order_table.c
    row = connection.execute(  # type: ignore[attr-defined]
        select(o.placer_order_number, o.filler_order_number, o.procedure_code,
               o.procedure_text, o.patient_id, o.issuer_of_patient_id, o.patient_name,
               o.patient_birth_date, o.patient_sex).where(o.id == order_pk)
    ).first()
    if row is None:
        return OrderFacts()
    return OrderFacts(
        placer_order_number=row.placer_order_number or "",
        filler_order_number=row.filler_order_number or "",
        procedure_code=row.procedure_code or "",
        procedure_text=row.procedure_text or "",
        patient=PatientInfo(row.patient_id or "", row.issuer_of_patient_id or "",
                            row.patient_name or "", row.patient_birth_date or "",
                            row.patient_sex or ""),
    )
