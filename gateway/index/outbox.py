"""State changes shared by the outboxes (forward jobs and event deliveries).

Both tables have the same delivery columns: ``state`` (pending, in_flight, done, dead,
...), ``attempts``, ``next_attempt_at``, ``lease_owner``/``lease_expires_at``,
``last_error``, ``dead_reason`` and time stamps. Updates are guarded by the lease, so a
worker that lost its lease cannot overwrite what another worker did.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BindParameter,
    Connection,
    FromClause,
    Table,
    Update,
    and_,
    bindparam,
    or_,
    select,
    update,
)

PENDING = "pending"
IN_FLIGHT = "in_flight"
DONE = "done"
DEAD = "dead"
SUPERSEDED = "superseded"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one delivery, to be recorded."""

    outcome: str  # success | warning | transient | permanent
    status: int | None = None
    error: str | None = None
    next_attempt_at: dt.datetime | None = None
    dead_reason: str | None = None
    """Set when the delivery becomes a dead letter."""


def due(table: FromClause, now: dt.datetime | BindParameter[Any]) -> Any:
    """Rows ready to be claimed: pending and due, or in flight under an expired lease
    (*now*: a time or a bound parameter)."""
    c = table.c
    return or_(
        and_(c.state == PENDING, or_(c.next_attempt_at.is_(None), c.next_attempt_at <= now)),
        and_(c.state == IN_FLIGHT, c.lease_expires_at < now),
    )


def not_held(table: Table, now: dt.datetime) -> Any:
    """Rows waiting (whenever due) or in flight under an expired lease: nobody's work."""
    c = table.c
    return or_(c.state == PENDING, and_(c.state == IN_FLIGHT, c.lease_expires_at < now))


def claim(
    connection: Connection, table: Table, ids: Sequence[int], *, owner: str,
    until: dt.datetime, now: dt.datetime,
) -> None:
    c = table.c
    connection.execute(
        update(table)
        .where(c.id.in_(list(ids)))
        .values(state=IN_FLIGHT, lease_owner=owner, lease_expires_at=until, updated_at=now)
    )


def owned(table: Table, row_id: Any, owner: Any) -> Any:
    """The row *row_id* while *owner* holds its lease (values or bound parameters)."""
    c = table.c
    return and_(c.id == row_id, c.lease_owner == owner, c.state == IN_FLIGHT)


def outcome_values(result: Outcome, attempts: int, now: dt.datetime) -> dict[str, Any]:
    """The column values an outcome leaves behind (the lease is always released)."""
    values: dict[str, Any] = {
        "attempts": attempts,
        "updated_at": now,
        "last_error": result.error,
        "lease_owner": None,
        "lease_expires_at": None,
    }
    if result.outcome in ("success", "warning"):
        values.update(state=DONE, completed_at=now, next_attempt_at=None)
    elif result.dead_reason is not None:
        values.update(state=DEAD, dead_reason=result.dead_reason, completed_at=now)
    else:
        values.update(state=PENDING, next_attempt_at=result.next_attempt_at)
    return values


_record_statements: dict[tuple[Table, tuple[str, ...]], Update] = {}


def _record_statement(table: Table, columns: tuple[str, ...]) -> Update:
    """The lease-guarded UPDATE setting *columns*, built once per shape (forwarding
    records one per delivered instance: building it each time cost more than running it)."""
    key = (table, columns)
    statement = _record_statements.get(key)
    if statement is None:
        statement = (
            update(table)
            .where(owned(table, bindparam("w_id"), bindparam("w_owner")))
            .values({column: bindparam(f"v_{column}") for column in columns})
        )
        _record_statements[key] = statement
    return statement


def record(
    connection: Connection, table: Table, row_id: int, *, owner: str, attempts: int,
    result: Outcome, now: dt.datetime, extra: dict[str, Any] | None = None,
) -> bool:
    """Record an outcome; False when the lease was lost meanwhile."""
    values = {**outcome_values(result, attempts, now), **(extra or {})}
    statement = _record_statement(table, tuple(sorted(values)))
    parameters = {f"v_{column}": value for column, value in values.items()}
    updated = connection.execute(statement, {"w_id": row_id, "w_owner": owner, **parameters})
    return bool(updated.rowcount)


def record_many(
    connection: Connection, table: Table,
    records: Sequence[tuple[int, int, Outcome, dict[str, Any]]], *, owner: str,
    now: dt.datetime,
) -> set[int]:
    """Record the outcomes of many rows (id, attempts, outcome, extra columns) with one
    statement execution per shape of update; the ids recorded, the others' leases were
    lost meanwhile (as :func:`record` answers False). The rows still held are read
    first, locked on PostgreSQL, so the updates then change exactly those."""
    if not records:
        return set()
    c = table.c
    held = set(connection.execute(
        select(c.id)
        .where(c.id.in_([row_id for row_id, *_ in records]), c.lease_owner == owner,
               c.state == IN_FLIGHT)
        .with_for_update()
    ).scalars())
    shapes: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row_id, attempts, result, extra in records:
        if row_id not in held:
            continue
        values = {**outcome_values(result, attempts, now), **extra}
        shapes.setdefault(tuple(sorted(values)), []).append(
            {"w_id": row_id, "w_owner": owner,
             **{f"v_{column}": value for column, value in values.items()}})
    for columns, parameters in shapes.items():
        connection.execute(_record_statement(table, columns), parameters)
    return held


def extend_leases(
    connection: Connection, table: Table, ids: Sequence[int], owner: str, until: dt.datetime
) -> None:
    c = table.c
    connection.execute(
        update(table)
        .where(c.id.in_(list(ids)), c.lease_owner == owner, c.state == IN_FLIGHT)
        .values(lease_expires_at=until)
    )


def release(
    connection: Connection, table: Table, ids: Sequence[int], owner: str, now: dt.datetime
) -> None:
    """Give claimed rows back untried (stop, or the batch ended early)."""
    c = table.c
    connection.execute(
        update(table)
        .where(c.id.in_(list(ids)), c.lease_owner == owner, c.state == IN_FLIGHT)
        .values(state=PENDING, lease_owner=None, lease_expires_at=None, updated_at=now)
    )


def release_node_leases(
    connection: Connection, table: Table, node: str, now: dt.datetime
) -> int:
    """At start-up: rows this node had in flight when it stopped become pending again."""
    c = table.c
    result = connection.execute(
        update(table)
        .where(c.state == IN_FLIGHT, c.lease_owner.like(f"{node}:%"))
        .values(state=PENDING, lease_owner=None, lease_expires_at=None, updated_at=now)
    )
    return int(result.rowcount)


def requeue_values(now: dt.datetime) -> dict[str, Any]:
    """A dead letter back to pending with a fresh retry budget."""
    return {
        "state": PENDING, "attempts": 0, "next_attempt_at": None, "dead_reason": None,
        "completed_at": None, "updated_at": now,
    }
