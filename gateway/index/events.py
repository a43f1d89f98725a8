"""Study events in the index: which studies are due, their summaries, the event outbox.

A study's event is raised exactly once per change: a conditional UPDATE bumps its
``event_version`` only if no event covers its latest instance yet, and the event rows
(and one delivery per sink) are inserted in the same transaction.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Connection, Table, desc, exists, func, select, update

from gateway.events.fhir import (
    InstanceSummary,
    OrderSummary,
    PatientSummary,
    SeriesSummary,
    StudySummary,
)
from gateway.index import outbox
from gateway.index.repository import (
    instance_table,
    patient_table,
    series_table,
    study_table,
)
from gateway.index.schema import Event, EventDelivery, Hl7Order

event_table = cast(Table, Event.__table__)
delivery_table = cast(Table, EventDelivery.__table__)
order_table = cast(Table, Hl7Order.__table__)


def due_studies(connection: Connection, cutoff: dt.datetime, limit: int = 50) -> list[int]:
    """Studies with no new instance since *cutoff* whose latest change has no event yet.

    Changes are counted (``change_seq``), not timed, so an instance committed late or
    stamped by a node whose clock lags still raises a revision.
    """
    c = study_table.c
    rows = connection.execute(
        select(c.id)
        .where(c.last_received_at <= cutoff, c.change_seq > c.evented_seq)
        .order_by(c.last_received_at)
        .limit(limit)
    )
    return [row[0] for row in rows]


@dataclass(frozen=True, slots=True)
class StudyEventClaim:
    version: int
    change_seq: int


def claim_study_event(
    connection: Connection, study_pk: int, cutoff: dt.datetime, now: dt.datetime
) -> StudyEventClaim | None:
    """Take the right to raise the next event of a study (None: not due, or taken by
    another process)."""
    c = study_table.c
    row = connection.execute(
        select(c.event_version, c.change_seq, c.evented_seq, c.last_received_at)
        .where(c.id == study_pk)
        .with_for_update()
    ).first()
    if row is None or row.last_received_at > cutoff or row.change_seq <= row.evented_seq:
        return None
    updated = connection.execute(
        update(study_table)
        .where(c.id == study_pk, c.event_version == row.event_version)
        .values(event_version=row.event_version + 1, evented_seq=row.change_seq,
                evented_at=now, event_error=None)
    )
    if not updated.rowcount:
        return None
    return StudyEventClaim(row.event_version + 1, row.change_seq)


def record_event_failure(
    connection: Connection, study_pk: int, change_seq: int, reason: str, now: dt.datetime
) -> None:
    """The events of this change cannot be built: say why, and wait for the next change
    (rather than retrying in a loop that would hold up every other study)."""
    c = study_table.c
    connection.execute(
        update(study_table)
        .where(c.id == study_pk, c.evented_seq < change_seq)
        .values(evented_seq=change_seq, event_error=reason[:2000], evented_at=now)
    )


def current_change(connection: Connection, study_pk: int) -> int:
    c = study_table.c
    return int(connection.execute(select(c.change_seq).where(c.id == study_pk)).scalar_one())


def announced_documents(connection: Connection, study_pk: int) -> dict[str, dt.datetime]:
    """SOP Instance UID -> when its latest DocumentReference event was raised."""
    e = event_table.c
    rows = connection.execute(
        select(e.resource_key, func.max(e.created_at))
        .where(e.study_pk == study_pk, e.kind == "DocumentReference")
        .group_by(e.resource_key)
    )
    return {key: _utc(when) for key, when in rows}


def _utc(value: Any) -> dt.datetime:
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    return cast(dt.datetime, value if value.tzinfo else value.replace(tzinfo=dt.UTC))


@dataclass(frozen=True, slots=True)
class LoadedStudy:
    """A study summary plus what event building needs besides FHIR."""

    pk: int
    summary: StudySummary
    series_of: dict[str, SeriesSummary]
    received_at: dict[str, dt.datetime]
    order_pk: int | None
    patient_pk: int
    patient_name: str | None
    patient_birth_date: str | None
    patient_sex: str | None


def load_study(connection: Connection, study_pk: int) -> LoadedStudy:
    """Everything about a study the events need, from the index (never the objects)."""
    s, p, se, i = study_table.c, patient_table.c, series_table.c, instance_table.c
    study = connection.execute(
        select(*s, p.patient_id, p.issuer_of_patient_id, p.patient_name, p.patient_birth_date,
               p.patient_sex)
        .join(patient_table, p.id == s.patient_pk)
        .where(s.id == study_pk)
    ).one()
    rows = connection.execute(
        select(se.series_instance_uid, se.modality, se.series_number, se.series_description,
               se.body_part_examined, i.sop_instance_uid, i.sop_class_uid, i.instance_number,
               i.document_title, i.content_date, i.content_time, i.size, i.sha1, i.sha256,
               i.object_key, i.received_at)
        .join(series_table, se.id == i.series_pk)
        .where(se.study_pk == study_pk, i.is_current.is_(True))
        .order_by(se.series_number, se.id, i.instance_number, i.id)
    ).all()
    grouped: dict[str, list[Any]] = {}
    for row in rows:
        grouped.setdefault(row.series_instance_uid, []).append(row)
    series_list = []
    received: dict[str, dt.datetime] = {}
    for uid, members in grouped.items():
        head = members[0]
        instances = []
        for row in members:
            key = row.object_key or _expected_key(study.study_instance_uid, uid, row)
            instances.append(InstanceSummary(
                sop_instance_uid=row.sop_instance_uid, sop_class_uid=row.sop_class_uid,
                instance_number=row.instance_number, document_title=row.document_title,
                content_date=row.content_date, content_time=row.content_time, size=row.size,
                sha1=row.sha1, object_key=key, received_at=row.received_at,
            ))
            received[row.sop_instance_uid] = row.received_at
        series_list.append(SeriesSummary(
            series_instance_uid=uid, modality=head.modality, series_number=head.series_number,
            series_description=head.series_description,
            body_part_examined=head.body_part_examined, instances=tuple(instances),
        ))
    order = None
    if study.order_pk is not None:
        o = connection.execute(
            select(order_table.c.accession_number, order_table.c.placer_order_number,
                   order_table.c.filler_order_number).where(order_table.c.id == study.order_pk)
        ).first()
        if o is not None:
            order = OrderSummary(o.accession_number, o.placer_order_number, o.filler_order_number)
    summary = StudySummary(
        study_instance_uid=study.study_instance_uid,
        patient=PatientSummary(study.patient_id, study.issuer_of_patient_id or ""),
        series=tuple(series_list),
        accession_number=study.accession_number,
        study_date=study.study_date,
        study_time=study.study_time,
        study_description=study.study_description,
        referring_physician_name=study.referring_physician_name,
        order=order,
    )
    return LoadedStudy(
        pk=study_pk, summary=summary, series_of={s.series_instance_uid: s for s in series_list},
        received_at=received, order_pk=study.order_pk, patient_pk=study.patient_pk,
        patient_name=study.patient_name, patient_birth_date=study.patient_birth_date,
        patient_sex=study.patient_sex,
    )


def _expected_key(study_uid: str, series_uid: str, row: Any) -> str:
    from gateway.objectstore import object_key

    return object_key(study_uid, series_uid, row.sop_instance_uid, row.sha256)


@dataclass(frozen=True, slots=True)
class NewEvent:
    id: str
    kind: str
    resource_key: str
    payload: str
    sinks: tuple[str, ...]


def insert_events(
    connection: Connection, study_pk: int, study_uid: str, *, version: int,
    events: Iterable[NewEvent], now: dt.datetime,
) -> list[str]:
    """Write events and their deliveries (the outbox); returns the event ids.

    Deliveries of older events about the same resource that have not gone out yet are
    superseded: a retry of an old revision must never overwrite a newer one.
    """
    ids = []
    for new in events:
        _supersede_older(connection, study_pk, new, now)
        event_id = new.id
        connection.execute(event_table.insert().values(
            id=event_id, study_pk=study_pk, study_instance_uid=study_uid, kind=new.kind,
            resource_key=new.resource_key, version=version, payload=new.payload,
            created_at=now,
        ))
        if new.sinks:
            connection.execute(delivery_table.insert(), [
                {"event_id": event_id, "sink": sink, "state": outbox.PENDING, "attempts": 0,
                 "created_at": now, "updated_at": now}
                for sink in new.sinks
            ])
        ids.append(event_id)
    return ids


def _supersede_older(
    connection: Connection, study_pk: int, new: NewEvent, now: dt.datetime
) -> None:
    e, d = event_table.c, delivery_table.c
    older = select(e.id).where(
        e.study_pk == study_pk, e.kind == new.kind, e.resource_key == new.resource_key
    )
    connection.execute(
        update(delivery_table)
        .where(d.event_id.in_(older), d.sink.in_(list(new.sinks)),
               d.state.in_([outbox.PENDING, outbox.DEAD]))
        .values(state=outbox.SUPERSEDED, updated_at=now, completed_at=now)
    )


@dataclass(frozen=True, slots=True)
class ClaimedDelivery:
    id: int
    event_id: str
    sink: str
    attempts: int
    kind: str
    resource_key: str
    version: int
    study_instance_uid: str
    payload: str
    created_at: dt.datetime


@dataclass(frozen=True, slots=True)
class Claim:
    deliveries: list[ClaimedDelivery]
    """Claimed under the lease, oldest first."""
    superseded: int = 0
    """Deliveries found stale on the way and superseded instead of claimed."""


def claim_deliveries(
    connection: Connection, sink: str, *, owner: str, now: dt.datetime,
    lease: dt.timedelta, limit: int,
) -> Claim:
    """Claim up to *limit* due deliveries to *sink*.

    A delivery that was in flight when a newer revision of its resource was written
    escaped insert_events' supersession; if it failed and came back, it must never be
    sent (it could overwrite the newer revision): it is superseded here instead.
    """
    d, e = delivery_table.c, event_table.c
    newer_event, newer_delivery = event_table.alias("newer_event"), delivery_table.alias("newer")
    superseded_by_newer = exists().where(
        newer_delivery.c.event_id == newer_event.c.id,
        newer_delivery.c.sink == d.sink,
        newer_delivery.c.id > d.id,
        newer_event.c.study_pk == e.study_pk,
        newer_event.c.kind == e.kind,
        newer_event.c.resource_key == e.resource_key,
    )
    statement = (
        select(d.id, d.event_id, d.sink, d.attempts, e.kind, e.resource_key, e.version,
               e.study_instance_uid, e.payload, e.created_at,
               superseded_by_newer.label("is_stale"))
        .join(event_table, e.id == d.event_id)
        .where(d.sink == sink, outbox.due(delivery_table, now))
        .order_by(d.id)
        .limit(limit)
        .with_for_update(skip_locked=True, of=delivery_table)
    )
    fields = set(ClaimedDelivery.__dataclass_fields__)
    superseded = 0
    while True:
        rows = connection.execute(statement).all()
        stale = [row.id for row in rows if row.is_stale]
        if stale:
            connection.execute(
                update(delivery_table)
                .where(d.id.in_(stale))
                .values(state=outbox.SUPERSEDED, lease_owner=None, lease_expires_at=None,
                        updated_at=now, completed_at=now)
            )
            superseded += len(stale)
        current = [row for row in rows if not row.is_stale]
        if current or len(rows) < limit:  # a batch all stale: look again at once
            break
    outbox.claim(connection, delivery_table, [r.id for r in current], owner=owner,
                 until=now + lease, now=now)
    return Claim(
        [ClaimedDelivery(**{k: v for k, v in row._mapping.items() if k in fields})
         for row in current],
        superseded,
    )


def dead_letter_unconfigured(
    connection: Connection, configured: Sequence[str], now: dt.datetime
) -> int:
    """Deliveries to sinks this node does not know become dead letters (requeue them if
    the sink comes back). Rows another node holds under a live lease are left alone."""
    c = delivery_table.c
    result = connection.execute(
        update(delivery_table)
        .where(outbox.not_held(delivery_table, now), c.sink.not_in(list(configured)))
        .values(state=outbox.DEAD, lease_owner=None, updated_at=now, completed_at=now,
                dead_reason="the sink is no longer in the configuration")
    )
    return int(result.rowcount)


@dataclass(frozen=True, slots=True)
class EventView:
    id: str
    kind: str
    study_instance_uid: str
    resource_key: str
    version: int
    created_at: dt.datetime
    deliveries: dict[str, str]
    """Sink -> state (with the dead reason when dead)."""


def recent_events(
    connection: Connection, limit: int = 50, study_instance_uid: str | None = None
) -> list[EventView]:
    e, d = event_table.c, delivery_table.c
    stmt = select(e.id, e.kind, e.study_instance_uid, e.resource_key, e.version, e.created_at)
    if study_instance_uid:
        stmt = stmt.where(e.study_instance_uid == study_instance_uid)
    events = connection.execute(stmt.order_by(desc(e.created_at)).limit(limit)).all()
    states: dict[str, dict[str, str]] = {}
    if events:
        for row in connection.execute(
            select(d.id, d.event_id, d.sink, d.state, d.dead_reason, d.last_error)
            .where(d.event_id.in_([event.id for event in events]))
        ):
            text = row.state
            if row.state == outbox.DEAD:
                text += f" (#{row.id}: {row.dead_reason})"
            elif row.state == outbox.PENDING and row.last_error:
                text += f" (retrying: {row.last_error})"
            states.setdefault(row.event_id, {})[row.sink] = text
    return [
        EventView(row.id, row.kind, row.study_instance_uid, row.resource_key, row.version,
                  row.created_at, states.get(row.id, {}))
        for row in events
    ]


def requeue_deliveries(
    connection: Connection, now: dt.datetime, *, ids: Sequence[int] = (),
    sink: str | None = None, study_instance_uid: str | None = None,
) -> int:
    if not (ids or sink or study_instance_uid):
        raise ValueError("requeue needs a delivery id, a sink or a study")
    d = delivery_table.c
    conditions = [d.state == outbox.DEAD]
    if ids:
        conditions.append(d.id.in_(list(ids)))
    if sink:
        conditions.append(d.sink == sink)
    if study_instance_uid:
        conditions.append(d.event_id.in_(
            select(event_table.c.id).where(event_table.c.study_instance_uid == study_instance_uid)
        ))
    result = connection.execute(
        update(delivery_table).where(*conditions).values(**outbox.requeue_values(now))
    )
    return int(result.rowcount)


def delivery_backlog(connection: Connection) -> dict[str, dict[str, int]]:
    """Sink -> state -> count."""
    d = delivery_table.c
    rows = connection.execute(select(d.sink, d.state, func.count()).group_by(d.sink, d.state))
    backlog: dict[str, dict[str, int]] = {}
    for sink, state, count in rows:
        backlog.setdefault(sink, {})[state] = int(count)
    return backlog


def dead_deliveries(connection: Connection, limit: int = 100) -> list[Any]:
    d, e = delivery_table.c, event_table.c
    return list(connection.execute(
        select(d.id, d.sink, d.attempts, d.dead_reason, d.completed_at, e.kind,
               e.study_instance_uid, e.version)
        .join(event_table, e.id == d.event_id)
        .where(d.state == outbox.DEAD)
        .order_by(desc(d.completed_at))
        .limit(limit)
    ).all())
