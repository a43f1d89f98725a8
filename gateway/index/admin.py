"""Index queries for the admin API and dashboard: searches and operator actions."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import Connection, Table, desc, func, select, update

from gateway.index import outbox
from gateway.index.queue import job_table
from gateway.index.repository import (
    SPOOLED,
    association_table,
    dialect_insert,
    instance_table,
    patient_table,
    series_table,
    study_table,
)
from gateway.index.schema import DestinationState

destination_state_table = cast(Table, DestinationState.__table__)


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value else None


def associations(
    connection: Connection, *, calling_ae: str | None = None, outcome: str | None = None,
    since: dt.datetime | None = None, until: dt.datetime | None = None, limit: int = 100,
) -> list[dict[str, Any]]:
    a = association_table.c
    stmt = select(association_table).order_by(desc(a.requested_at)).limit(limit)
    if calling_ae:
        stmt = stmt.where(a.calling_ae == calling_ae)
    if outcome:
        stmt = stmt.where(a.outcome == outcome)
    if since:
        stmt = stmt.where(a.requested_at >= since)
    if until:
        stmt = stmt.where(a.requested_at < until)
    rows = []
    for row in connection.execute(stmt):
        item = dict(row._mapping)
        item["requested_at"] = _iso(item["requested_at"])
        item["ended_at"] = _iso(item["ended_at"])
        rows.append(item)
    return rows


@dataclass
class StudyView:
    study_instance_uid: str
    patient_id: str
    patient_name: str | None
    accession_number: str | None
    study_date: str | None
    study_description: str | None
    modalities: list[str]
    instances: int
    last_received_at: str | None
    event_version: int
    deliveries: dict[str, dict[str, int]] = field(default_factory=dict)
    """Destination -> state -> count of forward jobs of current instances."""


def _date_filter(column: Any, value: str) -> Any:
    """``YYYYMMDD`` or a range ``YYYYMMDD-YYYYMMDD`` (either end may be open)."""
    if "-" in value:
        start, _, end = value.partition("-")
        conditions = []
        if start:
            conditions.append(column >= start)
        if end:
            conditions.append(column <= end)
        return conditions
    return [column == value]


def studies(
    connection: Connection, *, patient_id: str | None = None,
    accession_number: str | None = None, study_date: str | None = None,
    modality: str | None = None, limit: int = 50,
) -> list[StudyView]:
    s, p, se, i = study_table.c, patient_table.c, series_table.c, instance_table.c
    stmt = (
        select(s.id, s.study_instance_uid, p.patient_id, p.patient_name, s.accession_number,
               s.study_date, s.study_description, s.last_received_at, s.event_version)
        .join(patient_table, p.id == s.patient_pk)
        .order_by(desc(s.last_received_at))
        .limit(limit)
    )
    if patient_id:
        stmt = stmt.where(p.patient_id == patient_id)
    if accession_number:
        stmt = stmt.where(s.accession_number == accession_number)
    if study_date:
        stmt = stmt.where(*_date_filter(s.study_date, study_date))
    if modality:
        stmt = stmt.where(s.id.in_(select(se.study_pk).where(se.modality == modality)))
    found = connection.execute(stmt).all()
    views = []
    for row in found:
        counts = connection.execute(
            select(se.modality, func.count(i.id))
            .join(instance_table, i.series_pk == se.id)
            .where(se.study_pk == row.id, i.is_current.is_(True))
            .group_by(se.modality)
        ).all()
        view = StudyView(
            study_instance_uid=row.study_instance_uid, patient_id=row.patient_id,
            patient_name=row.patient_name, accession_number=row.accession_number,
            study_date=row.study_date, study_description=row.study_description,
            modalities=sorted({m for m, _ in counts if m}),
            instances=sum(n for _, n in counts),
            last_received_at=_iso(row.last_received_at), event_version=row.event_version,
        )
        j = job_table.c
        for destination, state, count in connection.execute(
            select(j.destination, j.state, func.count())
            .join(instance_table, i.id == j.instance_pk)
            .where(j.study_instance_uid == row.study_instance_uid, i.is_current.is_(True))
            .group_by(j.destination, j.state)
        ):
            view.deliveries.setdefault(destination, {})[state] = int(count)
        views.append(view)
    return views


def paused_destinations(connection: Connection) -> set[str]:
    d = destination_state_table.c
    return {row[0] for row in connection.execute(select(d.name).where(d.paused.is_(True)))}


def set_paused(connection: Connection, name: str, paused: bool, now: dt.datetime) -> None:
    stmt = dialect_insert(connection, destination_state_table).values(
        name=name, paused=paused, changed_at=now
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=["name"], set_={"paused": paused, "changed_at": now}
    )
    connection.execute(stmt)


def cancel_jobs(connection: Connection, ids: Sequence[int], now: dt.datetime) -> int:
    """Cancel pending or dead forward jobs (an operator decided they must not be sent)."""
    c = job_table.c
    result = connection.execute(
        update(job_table)
        .where(c.id.in_(list(ids)), c.state.in_([outbox.PENDING, outbox.DEAD]))
        .values(state="cancelled", updated_at=now, completed_at=now, lease_owner=None)
    )
    return int(result.rowcount)


def received_since(connection: Connection, since: dt.datetime) -> dict[str, int]:
    """Instances and bytes received since *since* (for the dashboard's throughput)."""
    i = instance_table.c
    count, size = connection.execute(
        select(func.count(), func.coalesce(func.sum(i.size), 0)).where(i.received_at >= since)
    ).one()
    return {"instances": int(count), "bytes": int(size)}


def spool_backlog(connection: Connection) -> int:
    """Instances held in a spool, not yet in the object store."""
    i = instance_table.c
    return int(connection.execute(
        select(func.count()).where(i.state == SPOOLED)).scalar_one())


def open_associations(connection: Connection) -> int:
    a = association_table.c
    return int(connection.execute(
        select(func.count()).where(a.outcome == "established")).scalar_one())
