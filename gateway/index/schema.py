"""The index schema: patients, studies, series, instance versions and associations.

Changes to this file go with an Alembic migration in ``gateway/index/migrations``;
a test checks that the migrations produce exactly this schema on SQLite and PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    literal_column,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.elements import ColumnElement


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timezone-aware UTC timestamp on every backend (SQLite stores naive text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)  # type: ignore[no-any-return]
        return value.astimezone(dt.UTC)  # type: ignore[no-any-return]


NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {  # noqa: RUF012 - SQLAlchemy reads this class attribute
        dt.datetime: UTCDateTime,
        str: String(),
    }


class Patient(Base):
    """A patient as identified by Patient ID and its issuer; attributes: newest wins.

    ``patient_key`` is what identifies the row: ``id:<issuer>|<Patient ID>``, or, for
    instances without a Patient ID, ``study:<Study Instance UID>`` (such patients are
    never merged with each other).
    """

    __tablename__ = "patient"

    id: Mapped[int] = mapped_column(primary_key=True)
    patient_key: Mapped[str] = mapped_column(unique=True)
    patient_id: Mapped[str] = mapped_column(default="", index=True)
    issuer_of_patient_id: Mapped[str] = mapped_column(default="")
    patient_name: Mapped[str | None]
    patient_birth_date: Mapped[str | None]
    patient_sex: Mapped[str | None]
    updated_at: Mapped[dt.datetime]
    merged_into_pk: Mapped[int | None] = mapped_column(ForeignKey("patient.id"))
    """Set by an HL7 merge (ADT^A40): this patient's studies now belong to that one."""


class Study(Base):
    __tablename__ = "study"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(unique=True)
    patient_pk: Mapped[int] = mapped_column(ForeignKey("patient.id"), index=True)
    accession_number: Mapped[str | None] = mapped_column(index=True)
    study_date: Mapped[str | None] = mapped_column(index=True)
    study_time: Mapped[str | None]
    study_description: Mapped[str | None]
    study_id: Mapped[str | None]
    referring_physician_name: Mapped[str | None]
    first_received_at: Mapped[dt.datetime]
    last_received_at: Mapped[dt.datetime] = mapped_column(index=True)
    event_version: Mapped[int] = mapped_column(default=0, server_default="0")
    """Version of the latest study event; each stable revision increases it."""
    change_seq: Mapped[int] = mapped_column(default=0, server_default="0")
    """Counts the changes of the study (new instances and versions), clock-independent."""
    evented_seq: Mapped[int] = mapped_column(default=0, server_default="0")
    """The ``change_seq`` the latest event covers; lower means an event is due."""
    evented_at: Mapped[dt.datetime | None]
    """When the latest event was raised."""
    event_error: Mapped[str | None] = mapped_column(Text)
    """Why the events of the latest change could not be built (retried on the next change)."""
    order_pk: Mapped[int | None] = mapped_column(ForeignKey("hl7_order.id"), index=True)
    """The HL7 order matched by accession number."""
    demographics_mismatch: Mapped[str | None] = mapped_column(Text)
    """Which patient attributes differ between the matched order and the images."""


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(unique=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    modality: Mapped[str | None] = mapped_column(index=True)
    series_number: Mapped[int | None]
    series_description: Mapped[str | None]
    body_part_examined: Mapped[str | None]
    last_received_at: Mapped[dt.datetime]


class Instance(Base):
    """One received version of a SOP instance. Exactly one version per UID is current.

    ``state`` is the upload outbox: ``spooled`` rows wait in this node's spool for the
    object store, ``stored`` rows are in the object store under ``object_key``. A spooled
    row's bytes are the file ``spool_name`` in the spool's ``ready/`` directory, or, when
    ``spool_name`` is NULL, its :class:`SpooledContent` row.
    """

    __tablename__ = "instance"
    __table_args__ = (
        Index(
            "uq_instance_current_sop_instance_uid",
            "sop_instance_uid",
            unique=True,
            sqlite_where=text("is_current"),
            postgresql_where=text("is_current"),
        ),
        Index("ix_instance_upload_queue", "state", "received_by", "next_upload_at"),
        # Only the few unrouted rows: a routed instance writes no entry here.
        Index(
            "ix_instance_unrouted",
            "routed",
            sqlite_where=text("routed IS 0"),
            postgresql_where=text("routed IS false"),
        ),
    )
    # Every index here is written for every received instance, so each one must pay for
    # itself. Lookups by SOP Instance UID go through the partial unique index, and must
    # state its condition exactly: use current_instance() below.

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    sop_instance_uid: Mapped[str]
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_class_uid: Mapped[str]
    instance_number: Mapped[int | None]
    number_of_frames: Mapped[int | None]
    transfer_syntax_uid: Mapped[str]
    size: Mapped[int] = mapped_column(BigInteger)
    """Bytes of the stored Part 10 object."""
    dataset_offset: Mapped[int]
    """Where the dataset starts in the stored object (after the file meta)."""
    sha256: Mapped[str] = mapped_column(String(64))
    """SHA-256 of the dataset bytes exactly as received (the content identity)."""
    version: Mapped[int] = mapped_column(default=1)
    is_current: Mapped[bool] = mapped_column(Boolean, default=True)
    state: Mapped[str] = mapped_column(String(16))
    spool_name: Mapped[str | None]
    object_key: Mapped[str | None]
    received_by: Mapped[str]
    calling_ae: Mapped[str]
    called_ae: Mapped[str]
    association_id: Mapped[str | None] = mapped_column(String(36))
    received_at: Mapped[dt.datetime] = mapped_column(index=True)
    stored_at: Mapped[dt.datetime | None]
    upload_attempts: Mapped[int] = mapped_column(default=0)
    next_upload_at: Mapped[dt.datetime | None]
    last_upload_error: Mapped[str | None] = mapped_column(Text)
    routed: Mapped[bool | None] = mapped_column(Boolean)
    """False: no route matched (kept and reported as unrouted). NULL: not evaluated."""
    document_title: Mapped[str | None]
    """Documents (encapsulated PDF/CDA, SR): Document Title or the SR's concept name."""
    document_mime_type: Mapped[str | None]
    content_date: Mapped[str | None]
    content_time: Mapped[str | None]
    sha1: Mapped[str | None] = mapped_column(String(40))
    """Documents only: SHA-1 of the stored object, for FHIR attachments."""


class SpooledContent(Base):
    """The bytes of a spooled instance small enough to be spooled in the index
    (``storage.spool_in_index_max_bytes``): committed in the same transaction as its
    ``instance`` row, so acknowledging it costs one flush of the database instead of the
    file's, its directory's and the database's. Deleted in the transaction that records
    the instance as stored."""

    __tablename__ = "spooled_content"

    instance_pk: Mapped[int] = mapped_column(ForeignKey("instance.id"), primary_key=True)
    content: Mapped[bytes] = mapped_column(LargeBinary)
    """The whole Part 10 object, preamble and file meta included, as it will be stored."""


def current_instance(name: str = "instance") -> ColumnElement[Any]:
    """``is_current`` of the instance table (or of its alias *name*), written exactly as
    the partial unique index states it. SQLite uses a partial index only for a query term
    identical to the index's condition (``is_current IS 1`` does not qualify), and no
    other index covers a lookup by SOP Instance UID."""
    return literal_column(f"{name}.is_current")


class ForwardJob(Base):
    """The forwarding outbox: one obligation to deliver one instance version to one
    destination, committed in the same transaction as the instance row.

    ``state``: ``pending`` (due at ``next_attempt_at``), ``in_flight`` (claimed under a
    lease), ``done``, ``dead`` (dead letter, see ``dead_reason``), ``superseded`` (a newer
    version of the instance replaced it before it was sent) or ``cancelled``.
    """

    __tablename__ = "forward_job"
    __table_args__ = (
        UniqueConstraint("instance_pk", "destination"),
        Index("ix_forward_job_queue", "destination", "state", "next_attempt_at"),
        Index("ix_forward_job_study", "study_instance_uid", "destination"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    instance_pk: Mapped[int] = mapped_column(ForeignKey("instance.id"), index=True)
    destination: Mapped[str]
    route: Mapped[str]
    route_morph: Mapped[str | None] = mapped_column(Text)
    """The route's morphing as configured when the instance was routed (JSON)."""
    study_instance_uid: Mapped[str]
    state: Mapped[str] = mapped_column(String(16), index=True)
    attempts: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[dt.datetime]
    updated_at: Mapped[dt.datetime]
    next_attempt_at: Mapped[dt.datetime | None]
    completed_at: Mapped[dt.datetime | None]
    lease_owner: Mapped[str | None]
    lease_expires_at: Mapped[dt.datetime | None]
    last_status: Mapped[int | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    warning: Mapped[str | None] = mapped_column(Text)
    dead_reason: Mapped[str | None] = mapped_column(Text)


class ForwardAttempt(Base):
    """Every try of a forward job: when, what came back, and why it failed."""

    __tablename__ = "forward_attempt"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    job_pk: Mapped[int] = mapped_column(ForeignKey("forward_job.id"), index=True)
    attempted_at: Mapped[dt.datetime]
    outcome: Mapped[str] = mapped_column(String(16))
    """``success``, ``warning``, ``transient`` or ``permanent``."""
    status: Mapped[int | None]
    error: Mapped[str | None] = mapped_column(Text)
    forward_association_id: Mapped[str | None] = mapped_column(String(36))
    node: Mapped[str | None]
    """The gateway node whose worker made the attempt."""


class Hl7Order(Base):
    """An imaging order received over HL7 (ORM^O01, OMI^O23); the latest message wins."""

    __tablename__ = "hl7_order"

    id: Mapped[int] = mapped_column(primary_key=True)
    order_key: Mapped[str] = mapped_column(unique=True)
    """Placer order number, or the accession number when there is none."""
    accession_number: Mapped[str | None] = mapped_column(index=True)
    placer_order_number: Mapped[str | None]
    filler_order_number: Mapped[str | None]
    requested_procedure_id: Mapped[str | None]
    study_instance_uid: Mapped[str | None]
    patient_id: Mapped[str | None] = mapped_column(index=True)
    issuer_of_patient_id: Mapped[str | None]
    patient_name: Mapped[str | None]
    patient_birth_date: Mapped[str | None]
    patient_sex: Mapped[str | None]
    procedure_code: Mapped[str | None]
    procedure_text: Mapped[str | None]
    modality: Mapped[str | None]
    scheduled_station_ae: Mapped[str | None]
    order_control: Mapped[str | None]
    order_status: Mapped[str | None]
    message_type: Mapped[str]
    message_control_id: Mapped[str | None]
    received_at: Mapped[dt.datetime]
    updated_at: Mapped[dt.datetime] = mapped_column(index=True)


class Hl7Message(Base):
    """The HL7 log: every inbound message and the ACK it got (no message content)."""

    __tablename__ = "hl7_message"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    received_at: Mapped[dt.datetime] = mapped_column(index=True)
    peer_address: Mapped[str]
    message_type: Mapped[str | None]
    control_id: Mapped[str | None]
    ack_code: Mapped[str] = mapped_column(String(2))
    detail: Mapped[str | None] = mapped_column(Text)


class Event(Base):
    """A study event (FHIR resource or HL7 message), written in the outbox transaction."""

    __tablename__ = "event"
    __table_args__ = (Index("ix_event_study", "study_instance_uid", "version"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    study_instance_uid: Mapped[str]
    kind: Mapped[str] = mapped_column(String(32))
    """``ImagingStudy``, ``DocumentReference`` or ``HL7``."""
    resource_key: Mapped[str]
    """What the event is about: the Study or SOP Instance UID."""
    version: Mapped[int]
    payload: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(index=True)


class EventDelivery(Base):
    """One event to one sink: the event outbox, with the forwarding queue's states."""

    __tablename__ = "event_delivery"
    __table_args__ = (
        UniqueConstraint("event_id", "sink"),
        Index("ix_event_delivery_queue", "sink", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    event_id: Mapped[str] = mapped_column(ForeignKey("event.id"), index=True)
    sink: Mapped[str]
    state: Mapped[str] = mapped_column(String(16), index=True)
    attempts: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[dt.datetime]
    updated_at: Mapped[dt.datetime]
    next_attempt_at: Mapped[dt.datetime | None]
    completed_at: Mapped[dt.datetime | None]
    lease_owner: Mapped[str | None]
    lease_expires_at: Mapped[dt.datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    dead_reason: Mapped[str | None] = mapped_column(Text)


class DestinationState(Base):
    """Operator state of a destination shared by all nodes: paused or not."""

    __tablename__ = "destination_state"

    name: Mapped[str] = mapped_column(primary_key=True)
    paused: Mapped[bool] = mapped_column(Boolean, default=False)
    changed_at: Mapped[dt.datetime]


class Association(Base):
    """The association log: who connected, what was sent, and how it ended."""

    __tablename__ = "association"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    node: Mapped[str]
    calling_ae: Mapped[str] = mapped_column(index=True)
    called_ae: Mapped[str]
    peer_address: Mapped[str]
    peer_port: Mapped[int]
    requested_at: Mapped[dt.datetime] = mapped_column(index=True)
    ended_at: Mapped[dt.datetime | None]
    outcome: Mapped[str] = mapped_column(String(16), index=True)
    """``established`` while open; then ``released``, ``aborted``, ``rejected`` or
    ``interrupted`` (the node stopped before the association ended)."""
    reject_reason: Mapped[str | None] = mapped_column(Text)
    instances_received: Mapped[int] = mapped_column(default=0)
    instances_failed: Mapped[int] = mapped_column(default=0)
    duplicates: Mapped[int] = mapped_column(default=0)
    new_versions: Mapped[int] = mapped_column(default=0)
    bytes_received: Mapped[int] = mapped_column(BigInteger, default=0)
    detail: Mapped[str | None] = mapped_column(Text)
