"""Reads and writes of the index. Each function runs inside the caller's transaction.

Writes use SQLAlchemy Core (``INSERT ... ON CONFLICT ... RETURNING`` on both SQLite and
PostgreSQL) because they sit on the C-STORE path; the ORM classes in ``schema`` define
the tables.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import Connection, Table, and_, bindparam, case, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect

from gateway.dicom.attributes import InstanceAttributes
from gateway.index import outbox
from gateway.index.prepared import Prepared
from gateway.index.schema import (
    Association,
    ForwardJob,
    Instance,
    Patient,
    Series,
    SpooledContent,
    Study,
    current_instance,
)

patient_table = cast(Table, Patient.__table__)
study_table = cast(Table, Study.__table__)
series_table = cast(Table, Series.__table__)
instance_table = cast(Table, Instance.__table__)
association_table = cast(Table, Association.__table__)
forward_job_table = cast(Table, ForwardJob.__table__)
spooled_content_table = cast(Table, SpooledContent.__table__)

SPOOLED = "spooled"
STORED = "stored"


class RecordOutcome(enum.Enum):
    STORED = "stored"
    """A new SOP instance."""
    NEW_VERSION = "new_version"
    """A known SOP instance with different content: recorded as a new current version."""
    DUPLICATE = "duplicate"
    """Identical content to the current version: nothing new recorded."""


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """Everything the index records about one received instance."""

    attributes: InstanceAttributes
    transfer_syntax_uid: str
    size: int
    dataset_offset: int
    sha256: str
    spool_name: str | None
    """The instance's file in the spool's ``ready/`` directory; None with *content*."""
    received_by: str
    calling_ae: str
    called_ae: str
    association_id: str | None
    received_at: dt.datetime
    sha1: str | None = None
    destinations: Mapping[str, str] = field(default_factory=dict)
    """Forwarding obligations: destination name -> the route that sent it there."""
    route_morphs: Mapping[str, str] = field(default_factory=dict)
    """Route name -> its morphing (JSON), snapshotted with the obligation."""
    routed: bool | None = None
    """False when no route matched (unrouted); None when routing is not configured."""
    content: bytes | bytearray | None = None
    """The whole Part 10 object, spooled in the index (a ``spooled_content`` row)."""


@dataclass(frozen=True, slots=True)
class RecordResult:
    outcome: RecordOutcome
    instance_pk: int
    version: int
    study_pk: int | None = None
    spool_file_adopted: bool = False
    """A duplicate whose current version had lost its spool file now uses the new one."""


def dialect_insert(connection: Connection, table: Any) -> Any:
    """INSERT with ON CONFLICT support on both SQLite and PostgreSQL."""
    if connection.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def patient_key(attrs: InstanceAttributes) -> str:
    """The patient row an instance belongs to (see :class:`~gateway.index.schema.Patient`)."""
    if attrs.patient_id:
        return f"id:{attrs.issuer_of_patient_id}|{attrs.patient_id}"
    return f"study:{attrs.study_instance_uid}"


# The statements of the C-STORE path are built once per dialect, compiled for the names
# of the values they are given, and run on the driver's cursor (gateway.index.prepared):
# SQLAlchemy's per-execution work cost more CPU than executing them.

_PATIENT_VALUES = ("patient_key", "patient_id", "issuer_of_patient_id", "patient_name",
                   "patient_birth_date", "patient_sex", "updated_at")
_STUDY_VALUES = ("study_instance_uid", "patient_pk", "accession_number", "study_date",
                 "study_time", "study_description", "study_id", "referring_physician_name",
                 "first_received_at", "last_received_at", "change_seq")
_SERIES_VALUES = ("series_instance_uid", "study_pk", "modality", "series_number",
                  "series_description", "body_part_examined", "last_received_at")
_INSTANCE_VALUES = (
    "sop_instance_uid", "series_pk", "sop_class_uid", "instance_number", "number_of_frames",
    "transfer_syntax_uid", "size", "dataset_offset", "sha256", "version", "is_current",
    "state", "spool_name", "received_by", "calling_ae", "called_ae", "association_id",
    "received_at", "upload_attempts", "routed", "document_title", "document_mime_type",
    "content_date", "content_time", "sha1",
)
_CONTENT_VALUES = ("instance_pk", "content")
_FORWARD_JOB_VALUES = ("instance_pk", "destination", "route", "route_morph",
                       "study_instance_uid", "state", "attempts", "created_at", "updated_at")


@dataclass(frozen=True, slots=True)
class _HotStatements:
    upsert_patient: Prepared
    upsert_study: Prepared
    upsert_series: Prepared
    find_current: Prepared
    insert_instance: Prepared
    insert_content: Prepared
    insert_forward_jobs: Prepared


def _build_upsert_patient(insert: Any) -> Any:
    stmt = insert(patient_table)
    c = patient_table.c
    return stmt.on_conflict_do_update(
        index_elements=[c.patient_key],
        set_={
            "patient_name": func.coalesce(stmt.excluded.patient_name, c.patient_name),
            "patient_birth_date": func.coalesce(
                stmt.excluded.patient_birth_date, c.patient_birth_date
            ),
            "patient_sex": func.coalesce(stmt.excluded.patient_sex, c.patient_sex),
            "updated_at": stmt.excluded.updated_at,
        },
    ).returning(c.id)


def _build_upsert_study(insert: Any) -> Any:
    stmt = insert(study_table)
    c = study_table.c
    newest = stmt.excluded
    return stmt.on_conflict_do_update(
        index_elements=[c.study_instance_uid],
        # The indexed columns (patient, accession number, study date) are not set here:
        # setting a column rewrites its index entry even to the same value, three pages
        # per instance. _upsert_study updates them when they actually change.
        set_={
            "study_time": func.coalesce(newest.study_time, c.study_time),
            "study_description": func.coalesce(newest.study_description, c.study_description),
            "study_id": func.coalesce(newest.study_id, c.study_id),
            "referring_physician_name": func.coalesce(
                newest.referring_physician_name, c.referring_physician_name
            ),
            # Never moves back: a commit that lands late must still look recent.
            "last_received_at": case(
                (newest.last_received_at > c.last_received_at, newest.last_received_at),
                else_=c.last_received_at,
            ),
            "change_seq": c.change_seq + 1,
        },
    ).returning(c.id, c.patient_pk, c.accession_number, c.study_date)


def _build_upsert_series(insert: Any) -> Any:
    stmt = insert(series_table)
    c = series_table.c
    newest = stmt.excluded
    return stmt.on_conflict_do_update(
        index_elements=[c.series_instance_uid],
        # As for the study: the indexed study and modality are updated only on a change.
        set_={
            "series_number": func.coalesce(newest.series_number, c.series_number),
            "series_description": func.coalesce(newest.series_description, c.series_description),
            "body_part_examined": func.coalesce(newest.body_part_examined, c.body_part_examined),
            "last_received_at": newest.last_received_at,
        },
    ).returning(c.id, c.study_pk, c.modality)


def _build_find_current() -> Any:
    c = instance_table.c
    return (
        select(c.id, c.sha256, c.version, c.transfer_syntax_uid, c.state, c.spool_name,
               c.received_by)
        .where(c.sop_instance_uid == bindparam("uid"), current_instance())
        .with_for_update()
    )


def _build_hot_statements(dialect: Dialect) -> _HotStatements:
    insert = postgresql.insert if dialect.name == "postgresql" else sqlite.insert
    return _HotStatements(
        upsert_patient=Prepared(_build_upsert_patient(insert), dialect, _PATIENT_VALUES),
        upsert_study=Prepared(_build_upsert_study(insert), dialect, _STUDY_VALUES),
        upsert_series=Prepared(_build_upsert_series(insert), dialect, _SERIES_VALUES),
        find_current=Prepared(_build_find_current(), dialect, ("uid",)),
        insert_instance=Prepared(instance_table.insert().returning(instance_table.c.id),
                                 dialect, _INSTANCE_VALUES),
        insert_content=Prepared(spooled_content_table.insert(), dialect, _CONTENT_VALUES),
        insert_forward_jobs=Prepared(forward_job_table.insert(), dialect, _FORWARD_JOB_VALUES),
    )


_hot_by_dialect: dict[str, _HotStatements] = {}


def _statements(connection: Connection) -> _HotStatements:
    dialect = connection.dialect
    statements = _hot_by_dialect.get(dialect.name)
    if statements is None:  # two threads may both build them: the same, either is kept
        statements = _hot_by_dialect[dialect.name] = _build_hot_statements(dialect)
    return statements


def _upsert_patient(connection: Connection, attrs: InstanceAttributes, now: dt.datetime) -> int:
    values = {
        "patient_key": patient_key(attrs),
        "patient_id": attrs.patient_id,
        "issuer_of_patient_id": attrs.issuer_of_patient_id,
        "patient_name": attrs.patient_name,
        "patient_birth_date": attrs.patient_birth_date,
        "patient_sex": attrs.patient_sex,
        "updated_at": now,
    }
    return int(_statements(connection).upsert_patient.execute(connection, values).id)


def _upsert_study(
    connection: Connection, attrs: InstanceAttributes, patient_pk: int, now: dt.datetime
) -> int:
    values = {
        "study_instance_uid": attrs.study_instance_uid,
        "patient_pk": patient_pk,
        "accession_number": attrs.accession_number,
        "study_date": attrs.study_date,
        "study_time": attrs.study_time,
        "study_description": attrs.study_description,
        "study_id": attrs.study_id,
        "referring_physician_name": attrs.referring_physician_name,
        "first_received_at": now,
        "last_received_at": now,
        "change_seq": 1,
    }
    return _upsert(connection, _statements(connection).upsert_study, study_table, values,
                   indexed=("patient_pk", "accession_number", "study_date"),
                   replace=("patient_pk",))


def _upsert_series(
    connection: Connection, attrs: InstanceAttributes, study_pk: int, now: dt.datetime
) -> int:
    values = {
        "series_instance_uid": attrs.series_instance_uid,
        "study_pk": study_pk,
        "modality": attrs.modality,
        "series_number": attrs.series_number,
        "series_description": attrs.series_description,
        "body_part_examined": attrs.body_part_examined,
        "last_received_at": now,
    }
    return _upsert(connection, _statements(connection).upsert_series, series_table, values,
                   indexed=("study_pk", "modality"), replace=("study_pk",))


def _upsert(
    connection: Connection, statement: Prepared, table: Table, values: dict[str, Any], *,
    indexed: tuple[str, ...], replace: tuple[str, ...],
) -> int:
    """Run an upsert that leaves the *indexed* columns alone (it returns their stored
    values), then write those of them that changed; returns the row's id."""
    stored = statement.execute(connection, values)
    changes = indexed_changes(
        {column: getattr(stored, column) for column in indexed},
        {column: values[column] for column in indexed},
        replace=replace,
    )
    if changes:
        connection.execute(update(table).where(table.c.id == stored.id).values(**changes))
    return int(stored.id)


def indexed_changes(
    stored: Mapping[str, Any], incoming: Mapping[str, Any], *, replace: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The indexed columns an upsert must still update: a *replace* column takes the
    incoming value; the others keep the stored one unless a new non-empty value arrives
    (as ``coalesce(new, stored)``). Empty when nothing changes, as for almost every
    instance after a study's first."""
    changes = {}
    for column, value in incoming.items():
        if value is None and column not in replace:
            continue
        if value != stored[column]:
            changes[column] = value
    return changes


def find_current(connection: Connection, sop_instance_uid: str) -> Any:
    """The current version of a SOP instance (locked for update on PostgreSQL)."""
    return _statements(connection).find_current.execute(connection, {"uid": sop_instance_uid})


def record_instance(
    connection: Connection,
    record: InstanceRecord,
    spool_file_exists: Callable[[str], bool] = lambda name: True,
) -> RecordResult:
    """Index one received instance: new, new version, or duplicate of the current one."""
    attrs = record.attributes
    current = find_current(connection, attrs.sop_instance_uid)
    if (
        current is not None
        and current.sha256 == record.sha256
        and current.transfer_syntax_uid == record.transfer_syntax_uid
    ):
        if (current.state == SPOOLED and current.spool_name is not None
                and current.received_by == record.received_by
                and not spool_file_exists(current.spool_name)):
            # The row was committed but its file is gone (a commit whose outcome was
            # unknown to us, so we answered 0xA700 and dropped the file): adopt this copy.
            # (Content spooled in the index cannot go missing: it commits with its row.
            # Another node's spool file is in its own spool, not missing from ours.)
            _adopt(connection, current.id, record)
            return RecordResult(
                RecordOutcome.DUPLICATE, current.id, current.version, spool_file_adopted=True
            )
        return RecordResult(RecordOutcome.DUPLICATE, current.id, current.version)

    now = record.received_at
    patient_pk = _upsert_patient(connection, attrs, now)
    study_pk = _upsert_study(connection, attrs, patient_pk, now)
    series_pk = _upsert_series(connection, attrs, study_pk, now)
    version = 1
    outcome = RecordOutcome.STORED
    if current is not None:
        connection.execute(
            update(instance_table).where(instance_table.c.id == current.id).values(is_current=False)
        )
        _supersede_pending_jobs(connection, current.id, now)
        version = current.version + 1
        outcome = RecordOutcome.NEW_VERSION
    statements = _statements(connection)
    instance_pk = statements.insert_instance.execute(
        connection,
        {
            "sop_instance_uid": attrs.sop_instance_uid,
            "series_pk": series_pk,
            "sop_class_uid": attrs.sop_class_uid,
            "instance_number": attrs.instance_number,
            "number_of_frames": attrs.number_of_frames,
            "transfer_syntax_uid": record.transfer_syntax_uid,
            "size": record.size,
            "dataset_offset": record.dataset_offset,
            "sha256": record.sha256,
            "version": version,
            "is_current": True,
            "state": SPOOLED,
            "spool_name": record.spool_name,
            "received_by": record.received_by,
            "calling_ae": record.calling_ae,
            "called_ae": record.called_ae,
            "association_id": record.association_id,
            "received_at": now,
            "upload_attempts": 0,
            "routed": record.routed,
            "document_title": attrs.document_title,
            "document_mime_type": attrs.document_mime_type,
            "content_date": attrs.content_date,
            "content_time": attrs.content_time,
            "sha1": record.sha1,
        },
    ).id
    if record.content is not None:
        statements.insert_content.execute(
            connection, {"instance_pk": instance_pk, "content": record.content}
        )
    if record.destinations:
        statements.insert_forward_jobs.execute_many(
            connection,
            [
                {
                    "instance_pk": instance_pk,
                    "destination": destination,
                    "route": route,
                    "route_morph": record.route_morphs.get(route),
                    "study_instance_uid": attrs.study_instance_uid,
                    "state": outbox.PENDING,
                    "attempts": 0,
                    "created_at": now,
                    "updated_at": now,
                }
                for destination, route in record.destinations.items()
            ],
        )
    return RecordResult(outcome, int(instance_pk), version, study_pk)


def _adopt(connection: Connection, instance_pk: int, record: InstanceRecord) -> None:
    """Make *record*'s copy of the bytes the spooled copy of the row *instance_pk*."""
    if record.content is not None:
        _statements(connection).insert_content.execute(
            connection, {"instance_pk": instance_pk, "content": record.content}
        )
    connection.execute(
        update(instance_table)
        .where(instance_table.c.id == instance_pk)
        .values(spool_name=record.spool_name, next_upload_at=None)
    )


def _supersede_pending_jobs(connection: Connection, instance_pk: int, now: dt.datetime) -> None:
    """A newer version replaces an older one not yet sent: send only the newest, so a
    retry of the old one can never overwrite the new one at the destination."""
    c = forward_job_table.c
    connection.execute(
        update(forward_job_table)
        .where(c.instance_pk == instance_pk, c.state == outbox.PENDING)
        .values(state=outbox.SUPERSEDED, updated_at=now, completed_at=now)
    )


# --- association log -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AssociationFacts:
    """What is known about an association when it is requested."""

    association_id: str
    node: str
    calling_ae: str
    called_ae: str
    peer_address: str
    peer_port: int
    requested_at: dt.datetime


@dataclass(frozen=True, slots=True)
class AssociationTotals:
    instances_received: int = 0
    instances_failed: int = 0
    duplicates: int = 0
    new_versions: int = 0
    bytes_received: int = 0


def insert_association(
    connection: Connection,
    facts: AssociationFacts,
    outcome: str,
    reject_reason: str | None = None,
    ended_at: dt.datetime | None = None,
) -> None:
    connection.execute(
        association_table.insert().values(
            id=facts.association_id,
            node=facts.node,
            calling_ae=facts.calling_ae,
            called_ae=facts.called_ae,
            peer_address=facts.peer_address,
            peer_port=facts.peer_port,
            requested_at=facts.requested_at,
            ended_at=ended_at,
            outcome=outcome,
            reject_reason=reject_reason,
            instances_received=0,
            instances_failed=0,
            duplicates=0,
            new_versions=0,
            bytes_received=0,
        )
    )


def finish_association(
    connection: Connection,
    association_id: str,
    *,
    outcome: str,
    totals: AssociationTotals,
    ended_at: dt.datetime,
    detail: str | None = None,
) -> None:
    connection.execute(
        update(association_table)
        .where(association_table.c.id == association_id)
        .values(
            outcome=outcome,
            ended_at=ended_at,
            instances_received=totals.instances_received,
            instances_failed=totals.instances_failed,
            duplicates=totals.duplicates,
            new_versions=totals.new_versions,
            bytes_received=totals.bytes_received,
            detail=detail,
        )
    )


def mark_interrupted_associations(connection: Connection, node: str, now: dt.datetime) -> int:
    """Close association rows this node left open when it stopped abruptly."""
    result = connection.execute(
        update(association_table)
        .where(association_table.c.node == node, association_table.c.outcome == "established")
        .values(outcome="interrupted", ended_at=now)
    )
    return int(result.rowcount)


# --- upload outbox -----------------------------------------------------------------


def due_uploads(
    connection: Connection, node: str, now: dt.datetime, limit: int, exclude: Iterable[int] = ()
) -> Sequence[Any]:
    """Spooled instances of this node whose upload is due, oldest first."""
    c = instance_table.c
    stmt = (
        select(
            c.id,
            c.spool_name,
            c.sha256,
            c.size,
            c.dataset_offset,
            c.sop_instance_uid,
            c.upload_attempts,
            series_table.c.series_instance_uid,
            study_table.c.study_instance_uid,
        )
        .join(series_table, series_table.c.id == c.series_pk)
        .join(study_table, study_table.c.id == series_table.c.study_pk)
        .where(
            c.state == SPOOLED,
            c.received_by == node,
            (c.next_upload_at.is_(None)) | (c.next_upload_at <= now),
        )
        .order_by(c.id)
        .limit(limit)
    )
    excluded = list(exclude)
    if excluded:
        stmt = stmt.where(c.id.not_in(excluded))
    return connection.execute(stmt).all()


# Built once: the uploader runs it for every instance.
_MARK_STORED = (
    update(instance_table)
    .where(instance_table.c.id == bindparam("w_id"), instance_table.c.state == SPOOLED)
    .values(
        state=STORED,
        object_key=bindparam("v_key"),
        stored_at=bindparam("v_now"),
        spool_name=None,
        next_upload_at=None,
        last_upload_error=None,
    )
)


def mark_stored_many(
    connection: Connection, stored: Sequence[tuple[int, str]], now: dt.datetime
) -> set[int]:
    """Record spooled instances as stored: (primary key, object key) each. Their bytes
    spooled in the index, if any, are deleted. Returns the primary keys of those that
    were still spooled (the others are left as they are)."""
    if not stored:
        return set()
    c = instance_table.c
    wanted = [pk for pk, _ in stored]
    query = select(c.id).where(c.id.in_(wanted), c.state == SPOOLED)
    if connection.dialect.name == "postgresql":
        query = query.with_for_update()
    spooled = {int(pk) for pk in connection.execute(query).scalars()}
    if not spooled:
        return spooled
    connection.execute(_MARK_STORED, [
        {"w_id": pk, "v_key": key, "v_now": now} for pk, key in stored if pk in spooled
    ])
    # Every one of them, not only those spooled in the index when the upload was claimed:
    # a row whose spool file went missing may have adopted a copy in the index meanwhile.
    cc = spooled_content_table.c
    connection.execute(spooled_content_table.delete().where(cc.instance_pk.in_(spooled)))
    return spooled


def spooled_contents(connection: Connection, instance_pks: Iterable[int]) -> dict[int, bytes]:
    """The bytes of the given instances that are spooled in the index, by primary key."""
    wanted = list(instance_pks)
    if not wanted:
        return {}
    c = spooled_content_table.c
    rows = connection.execute(select(c.instance_pk, c.content).where(c.instance_pk.in_(wanted)))
    return {int(pk): bytes(content) for pk, content in rows}


def mark_upload_failed(
    connection: Connection, instance_pk: int, attempts: int, next_at: dt.datetime, error: str
) -> None:
    connection.execute(
        update(instance_table)
        .where(instance_table.c.id == instance_pk)
        .values(upload_attempts=attempts, next_upload_at=next_at, last_upload_error=error[:2000])
    )


def spooled_names(connection: Connection, node: str) -> set[str]:
    """Spool names this node's index still references."""
    c = instance_table.c
    rows = connection.execute(
        select(c.spool_name).where(and_(c.state == SPOOLED, c.received_by == node))
    )
    return {name for (name,) in rows if name}


def spool_backlog(connection: Connection, node: str) -> int:
    c = instance_table.c
    stmt = select(func.count()).where(c.state == SPOOLED, c.received_by == node)
    return int(connection.execute(stmt).scalar_one())
