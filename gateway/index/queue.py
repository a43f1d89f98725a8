"""The per-destination forwarding queue: claims with leases, outcomes, and admin views.

Claiming is safe with several workers and several gateway processes: on PostgreSQL the
candidate rows are locked with ``SELECT ... FOR UPDATE SKIP LOCKED``; on SQLite every
write transaction starts with ``BEGIN IMMEDIATE``, so the select-then-claim is already
serialised. A claim is a lease: a worker that dies leaves rows ``in_flight`` until the
lease expires (or its node restarts), and then they are claimed again.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import (
    Connection,
    Select,
    Table,
    and_,
    bindparam,
    case,
    exists,
    func,
    or_,
    select,
    update,
)

from gateway.index import outbox
from gateway.index.outbox import Outcome
from gateway.index.repository import STORED, instance_table, series_table
from gateway.index.schema import ForwardAttempt, ForwardJob

job_table = cast(Table, ForwardJob.__table__)
attempt_table = cast(Table, ForwardAttempt.__table__)
_INSERT_ATTEMPT = attempt_table.insert()

PENDING = outbox.PENDING
IN_FLIGHT = outbox.IN_FLIGHT
DONE = outbox.DONE
DEAD = outbox.DEAD
SUPERSEDED = outbox.SUPERSEDED


@dataclass(frozen=True, slots=True)
class ClaimedJob:
    """A job and what is needed to send its instance."""

    id: int
    instance_pk: int
    destination: str
    route: str
    route_morph: str | None
    attempts: int
    created_at: dt.datetime
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    size: int
    sha256: str
    instance_state: str
    spool_name: str | None
    object_key: str | None
    received_association_id: str | None = None
    """The association that brought the instance in (ties forward logs to receive logs)."""
    dataset_offset: int = 0
    """Where the data set starts in the stored object (after the file meta group)."""


def _sendable_by(node: Any, instances: Any = instance_table) -> Any:
    # A spooled instance exists only on the node that received it; once stored it is in
    # the shared object store and any node may send it.
    i = instances.c
    return or_(i.state == STORED, i.received_by == node)


def _first_of_its_study(node: Any, now: Any) -> Any:
    """No older job of the same study is waiting for the destination (and sendable by
    *node*): a claim starts only at the head of a study.

    Without this, on PostgreSQL a worker whose pick skipped the head row (locked by
    another worker's claim in progress) would take the next row of the same study, and
    the study would be split over two associations.
    """
    c = job_table.c
    older = job_table.alias("older_job")
    older_instance = instance_table.alias("older_instance")
    return ~exists(
        select(older.c.id)
        .join(older_instance, older_instance.c.id == older.c.instance_pk)
        .where(
            older.c.destination == c.destination,
            older.c.study_instance_uid == c.study_instance_uid,
            older.c.id < c.id,
            outbox.due(older, now),
            _sendable_by(node, older_instance),
        )
    )


def claim_batch(
    connection: Connection,
    destination: str,
    *,
    node: str,
    owner: str,
    now: dt.datetime,
    lease: dt.timedelta,
    limit: int,
) -> list[ClaimedJob]:
    """Claim up to *limit* due jobs of one study (the oldest due study) for *owner*."""
    head, batch = _claim_statements(connection.dialect.name == "postgresql")
    values = {"destination": destination, "now": now, "node": node}
    first = connection.execute(head, values).first()
    if first is None:
        return []
    rows = connection.execute(
        batch, {**values, "study": first.study_instance_uid, "limit": limit}).all()
    # A job of a version that is no longer current (it failed and came back after a newer
    # version arrived) must never be sent: it could overwrite the newer one.
    stale = [row.id for row in rows if not row.is_current]
    if stale:
        c = job_table.c
        connection.execute(
            update(job_table)
            .where(c.id.in_(stale))
            .values(state=SUPERSEDED, lease_owner=None, updated_at=now, completed_at=now)
        )
    current = [row for row in rows if row.is_current]
    outbox.claim(
        connection, job_table, [row.id for row in current], owner=owner, until=now + lease, now=now
    )
    fields = set(ClaimedJob.__dataclass_fields__)
    return [
        ClaimedJob(**{k: v for k, v in row._mapping.items() if k in fields}) for row in current
    ]


_claims: dict[bool, tuple[Select[Any], Select[Any]]] = {}


def _claim_statements(postgresql: bool) -> tuple[Select[Any], Select[Any]]:
    """The claim's two queries, built once (building them cost more than running them,
    and the forwarder's claim holds the write lock the listener waits for): the head of
    the oldest due study, then that study's due jobs. Parameters: ``destination``,
    ``now``, ``node``, and for the second ``study`` and ``limit``."""
    statements = _claims.get(postgresql)
    if statements is not None:
        return statements
    c = job_table.c
    i = instance_table.c
    now: Any = bindparam("now")
    node: Any = bindparam("node")
    base = (
        select(c.id, c.study_instance_uid)
        .join(instance_table, i.id == c.instance_pk)
        .where(c.destination == bindparam("destination"), outbox.due(job_table, now),
               _sendable_by(node))
    )
    if postgresql:
        # SKIP LOCKED may pass over the head of a study that another worker is claiming;
        # on SQLite claims are serialized by the write lock, so the oldest due job is
        # always the head of its study and the (costly) check is not needed.
        base = base.where(_first_of_its_study(node, now))
    head = base.order_by(c.id).limit(1).with_for_update(skip_locked=True, of=job_table)
    batch = (
        select(
            c.id,
            c.instance_pk,
            c.destination,
            c.route,
            c.route_morph,
            c.attempts,
            c.created_at,
            c.study_instance_uid,
            series_table.c.series_instance_uid,
            i.sop_instance_uid,
            i.sop_class_uid,
            i.transfer_syntax_uid,
            i.size,
            i.dataset_offset,
            i.sha256,
            i.state.label("instance_state"),
            i.spool_name,
            i.object_key,
            i.is_current,
            i.association_id.label("received_association_id"),
        )
        .join(instance_table, i.id == c.instance_pk)
        .join(series_table, series_table.c.id == i.series_pk)
        .where(
            c.destination == bindparam("destination"),
            c.study_instance_uid == bindparam("study"),
            outbox.due(job_table, now),
            _sendable_by(node),
        )
        .order_by(c.id)
        .limit(bindparam("limit"))
        .with_for_update(skip_locked=True, of=job_table)
    )
    _claims[postgresql] = head, batch
    return head, batch


def extend_leases(
    connection: Connection, ids: Sequence[int], owner: str, until: dt.datetime
) -> None:
    outbox.extend_leases(connection, job_table, ids, owner, until)


def record_outcome(
    connection: Connection,
    job_id: int,
    *,
    owner: str,
    attempts: int,
    result: Outcome,
    now: dt.datetime,
    forward_association_id: str | None = None,
) -> bool:
    """Record one attempt and move the job on. False when the lease was lost meanwhile."""
    return not record_outcomes(connection, [(job_id, attempts, result)], owner=owner, now=now,
                               forward_association_id=forward_association_id)


def record_outcomes(
    connection: Connection,
    results: Sequence[tuple[int, int, Outcome]],
    *,
    owner: str,
    now: dt.datetime,
    forward_association_id: str | None = None,
) -> list[int]:
    """Record the attempts of jobs (id, attempts, outcome) of one association and move
    them on, with a statement execution per kind of outcome (not two per job): the ids
    whose lease was lost meanwhile (nothing recorded for them)."""
    records = []
    for job_id, attempts, result in results:
        extra: dict[str, Any] = {"last_status": result.status}
        if result.outcome == "warning":
            extra["warning"] = result.error
        records.append((job_id, attempts, result, extra))
    recorded = outbox.record_many(connection, job_table, records, owner=owner, now=now)
    node = owner.split(":", 1)[0]
    rows = [
        {
            "node": node,
            "job_pk": job_id,
            "attempted_at": now,
            "outcome": result.outcome,
            "status": result.status,
            "error": result.error[:2000] if result.error else None,
            "forward_association_id": forward_association_id,
        }
        for job_id, _attempts, result in results if job_id in recorded
    ]
    if rows:
        connection.execute(_INSERT_ATTEMPT, rows)
    return [job_id for job_id, _attempts, _result in results if job_id not in recorded]


def release(connection: Connection, ids: Sequence[int], owner: str, now: dt.datetime) -> None:
    """Give claimed jobs back untried (stop, or the batch ended early)."""
    outbox.release(connection, job_table, ids, owner, now)


def dead_letter_unconfigured(
    connection: Connection, configured: Sequence[str], now: dt.datetime
) -> int:
    """Jobs for destinations no longer in the configuration become dead letters (so they
    are visible, and can be requeued if the destination comes back)."""
    c = job_table.c
    result = connection.execute(
        update(job_table)
        .where(outbox.not_held(job_table, now), c.destination.not_in(list(configured)))
        .values(
            state=DEAD, lease_owner=None, updated_at=now, completed_at=now,
            dead_reason="the destination is no longer in the configuration",
        )
    )
    return int(result.rowcount)


def release_node_leases(connection: Connection, node: str, now: dt.datetime) -> int:
    """At start-up: jobs this node had in flight when it stopped become pending again."""
    return outbox.release_node_leases(connection, job_table, node, now)


# --- admin views -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QueueStatus:
    destination: str
    pending: int
    in_flight: int
    retrying: int
    dead: int
    done: int
    oldest_pending: dt.datetime | None


def queue_status(connection: Connection) -> list[QueueStatus]:
    c = job_table.c

    def count(condition: Any) -> Any:
        return func.sum(case((condition, 1), else_=0))

    rows = connection.execute(
        select(
            c.destination,
            count(c.state == PENDING),
            count(c.state == IN_FLIGHT),
            count(and_(c.state == PENDING, c.attempts > 0)),
            count(c.state == DEAD),
            count(c.state == DONE),
            func.min(case((c.state.in_([PENDING, IN_FLIGHT]), c.created_at), else_=None)),
        ).group_by(c.destination).order_by(c.destination)
    ).all()
    return [
        QueueStatus(
            destination=row[0],
            pending=int(row[1] or 0),
            in_flight=int(row[2] or 0),
            retrying=int(row[3] or 0),
            dead=int(row[4] or 0),
            done=int(row[5] or 0),
            oldest_pending=_as_utc(row[6]),
        )
        for row in rows
    ]


def _as_utc(value: Any) -> dt.datetime | None:
    # min() over a TypeDecorator column comes back raw on SQLite (text) and PostgreSQL.
    if value is None:
        return None
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return cast(dt.datetime, value)


def unrouted_count(connection: Connection) -> int:
    i = instance_table.c
    stmt = select(func.count()).where(i.routed.is_(False), i.is_current.is_(True))
    return int(connection.execute(stmt).scalar_one())


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: int
    destination: str
    route: str
    study_instance_uid: str
    sop_instance_uid: str
    attempts: int
    last_status: int | None
    reason: str
    completed_at: dt.datetime | None


def dead_letters(
    connection: Connection, destination: str | None = None, limit: int = 100
) -> list[DeadLetter]:
    c = job_table.c
    stmt = (
        select(
            c.id, c.destination, c.route, c.study_instance_uid, instance_table.c.sop_instance_uid,
            c.attempts, c.last_status, c.dead_reason, c.completed_at,
        )
        .join(instance_table, instance_table.c.id == c.instance_pk)
        .where(c.state == DEAD)
        .order_by(c.completed_at.desc(), c.id.desc())
        .limit(limit)
    )
    if destination:
        stmt = stmt.where(c.destination == destination)
    return [
        DeadLetter(
            id=row.id, destination=row.destination, route=row.route,
            study_instance_uid=row.study_instance_uid, sop_instance_uid=row.sop_instance_uid,
            attempts=row.attempts, last_status=row.last_status, reason=row.dead_reason or "",
            completed_at=row.completed_at,
        )
        for row in connection.execute(stmt)
    ]


def requeue(
    connection: Connection,
    now: dt.datetime,
    *,
    job_ids: Sequence[int] = (),
    destination: str | None = None,
    study_instance_uid: str | None = None,
) -> int:
    """Dead letters back to pending with a fresh retry budget; returns how many."""
    if not (job_ids or destination or study_instance_uid):
        raise ValueError("requeue needs a job id, a destination or a study")
    c = job_table.c
    i = instance_table.c
    # Correlated, so each dead job looks up its own instance by primary key (an IN over
    # all current instances would read the whole table).
    current = exists().where(i.id == c.instance_pk, i.is_current.is_(True))
    conditions = [c.state == DEAD, current]
    if job_ids:
        conditions.append(c.id.in_(list(job_ids)))
    if destination:
        conditions.append(c.destination == destination)
    if study_instance_uid:
        conditions.append(c.study_instance_uid == study_instance_uid)
    result = connection.execute(
        update(job_table).where(*conditions).values(**outbox.requeue_values(now))
    )
    return int(result.rowcount)
