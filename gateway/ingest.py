"""Where an instance is acknowledged: durable in the spool and committed in the index.

:meth:`Ingestor.store` takes a fully received Part 10 object, reads only its header,
makes it durable and commits its index row, then returns the status for the C-STORE
response. Success is returned only after both are on stable storage. A small object
(up to ``storage.spool_in_index_max_bytes``) is spooled in the index itself: its bytes
go into the same transaction as its index row, so one commit makes both durable. A
larger one is fsynced into the spool directory first. Any failure leaves no partial
record: the spool file is removed and the transaction is rolled back.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import mmap
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from io import BufferedReader
from pathlib import Path

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, SQLAlchemyError

from gateway.dicom.attributes import (
    INDEXED_TAGS,
    InstanceAttributes,
    InvalidInstanceError,
    extract_attributes,
    is_document,
)
from gateway.dicom.header import Header, HeaderError, read_file_meta, read_header
from gateway.dicom.transfer_syntax import dataset_encoding
from gateway.group_commit import GroupCommit
from gateway.index import repository
from gateway.index.database import describe_error
from gateway.index.repository import InstanceRecord, RecordOutcome
from gateway.logs import get_logger
from gateway.routing import RoutingDecision
from gateway.spool import Spool, SpoolError
from gateway.status import Status

log = get_logger(__name__)

_HASH_CHUNK = 1024 * 1024
_KEEP_IDLE_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class ReceivedInstance:
    """A C-STORE request whose dataset has been fully received as a Part 10 object:
    written to the file *path*, or held in memory as *content* (then *path* is None)."""

    path: Path | None
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    content: bytes | bytearray | None = None
    dataset_offset: int | None = None
    """Where the data set starts, when the receiver wrote the file meta group itself
    (it is then not parsed again)."""
    digests: tuple[str, str | None] | None = None
    """The data set's SHA-256 and, for a document, the whole object's SHA-1, when the
    receiver computed them as the bytes arrived (they are then not read back)."""

    def discard(self) -> None:
        """Remove the received file, if there is one (it will not be kept)."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)


@dataclass(frozen=True, slots=True)
class Sender:
    """The association an instance arrived on."""

    calling_ae: str
    called_ae: str
    association_id: str | None
    peer_address: str = ""


Router = Callable[[Header, Sender], RoutingDecision]
"""Decides an instance's destinations from its header and the association."""


@dataclass(frozen=True, slots=True)
class StoreResult:
    """The status to answer with, and what happened, for the association log."""

    status: Status
    outcome: RecordOutcome | None = None
    error_comment: str | None = None
    size: int = 0
    version: int = 0
    attributes: InstanceAttributes | None = None
    destinations: Mapping[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == Status.SUCCESS


@dataclass(frozen=True, slots=True)
class _Routing:
    router: Router | None
    header_tags: frozenset[int]


@dataclass(frozen=True, slots=True)
class _Parsed:
    """What the header of a received object says, for its index record."""

    attributes: InstanceAttributes
    offset: int
    """Where the data set starts (after the file meta group)."""
    decision: RoutingDecision | None


class _KeptConnection:
    """The connection the group commit's batches run on, kept from one batch to the next.

    Checking a connection out of the pool and back in for every C-STORE cost more CPU
    than some of its statements; only one batch runs at a time, so one connection serves
    them all. It goes back to the pool when a batch ends with an error or leaves it
    unusable, and after a pause of :data:`_KEEP_IDLE_SECONDS` (so that the pool checks a
    PostgreSQL connection again before it is used)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._kept: Connection | None = None
        self._used = 0.0
        self._closed = False
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def connection(self, *, fresh: bool = False) -> Iterator[Connection]:
        """A connection for one batch: the kept one, or (*fresh*, or none kept, or kept
        too long unused) a new one from the pool."""
        with self._lock:
            kept, self._kept = self._kept, None
        if kept is not None and (fresh or time.monotonic() - self._used > _KEEP_IDLE_SECONDS):
            _close_quietly(kept)
            kept = None
        connection = kept if kept is not None else self._engine.connect()
        try:
            yield connection
        except BaseException:
            _close_quietly(connection)
            raise
        with self._lock:
            if not (self._closed or connection.invalidated or connection.in_transaction()):
                self._kept, self._used = connection, time.monotonic()
                return
        _close_quietly(connection)

    def close(self) -> None:
        """Give the kept connection back; from now on none is kept."""
        with self._lock:
            self._closed = True
            kept, self._kept = self._kept, None
        if kept is not None:
            _close_quietly(kept)


def _close_quietly(connection: Connection) -> None:
    with contextlib.suppress(SQLAlchemyError):
        connection.close()


class _CommitUncertainError(Exception):
    """COMMIT failed: the transaction may or may not have been applied."""


class _RefusedError(Exception):
    def __init__(self, status: Status, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Ingestor:
    """Makes received instances durable and indexed; safe to call from many threads."""

    def __init__(
        self,
        engine: Engine,
        spool: Spool,
        node_name: str,
        *,
        router: Router | None = None,
        extra_tags: Iterable[int] = (),
        on_stored: Callable[[Mapping[str, str]], None] | None = None,
        clock: Callable[[], dt.datetime] = _utcnow,
        on_batch: Callable[[int], None] | None = None,
        in_index_max_bytes: int = 0,
    ) -> None:
        self.engine = engine
        self.spool = spool
        self.node_name = node_name
        self.in_index_max_bytes = in_index_max_bytes
        """Objects up to this size are spooled in the index (see the module's docstring)."""
        self._routing = _Routing(router, INDEXED_TAGS | frozenset(extra_tags))
        self.on_stored = on_stored or (lambda destinations: None)
        self.clock = clock
        self._group: GroupCommit[InstanceRecord, repository.RecordResult] = GroupCommit(
            self._commit_batch, on_batch=on_batch
        )
        self._connection = _KeptConnection(engine)

    def close(self) -> None:
        """Return the connection kept for commits to the pool (the node is stopping)."""
        self._connection.close()

    def set_routing(self, router: Router | None, extra_tags: Iterable[int]) -> None:
        """Route new instances with *router* (a configuration reload); instances being
        read keep the router they started with."""
        self._routing = _Routing(router, INDEXED_TAGS | frozenset(extra_tags))

    def store(self, received: ReceivedInstance, sender: Sender) -> StoreResult:
        """Make *received* durable and indexed; return the C-STORE status to send."""
        try:
            received = self._in_memory_if_small(received)
            record = self._read(received, sender)
            self._check_room()
        except _RefusedError as refusal:
            received.discard()
            return StoreResult(refusal.status, error_comment=refusal.comment)
        except OSError as exc:
            received.discard()
            log.error("spool_read_failed", error=str(exc))
            return StoreResult(Status.OUT_OF_RESOURCES, error_comment="spool read failed")
        if received.content is not None:
            # Spooled in the index: the commit below makes the bytes durable with the row.
            received.discard()
            return self._index(replace(record, content=received.content))
        assert received.path is not None
        try:
            spool_name = self.spool.persist(received.path)
        except SpoolError as exc:
            log.error("spool_write_failed", error=str(exc))
            return StoreResult(Status.OUT_OF_RESOURCES, error_comment="spool write failed")
        return self._index(replace(record, spool_name=spool_name))

    def _in_memory_if_small(self, received: ReceivedInstance) -> ReceivedInstance:
        """A received file small enough to be spooled in the index, read into memory (the
        file itself is not durable yet, and making it so would cost two flushes)."""
        if received.content is not None or received.path is None:
            return received
        if received.path.stat().st_size > self.in_index_max_bytes:
            return received
        return replace(received, content=received.path.read_bytes())

    def _check_room(self) -> None:
        if not self.spool.has_room():
            log.error("spool_full", spool_dir=str(self.spool.root))
            raise _RefusedError(Status.OUT_OF_RESOURCES, "spool disk is full")

    def _index(self, record: InstanceRecord) -> StoreResult:
        """Commit the index row of a durable spool file; Success only when committed."""
        spool_name = record.spool_name
        try:
            result = self._commit(record)
        except _CommitUncertainError as exc:
            # The COMMIT itself failed: it may have reached the database. Keep the file;
            # a re-send adopts it, and the next start-up sets it aside if unreferenced.
            log.error("index_commit_uncertain", error=describe_error(exc.__cause__ or exc))
            return StoreResult(Status.OUT_OF_RESOURCES, error_comment="index database unavailable")
        except DataError as exc:
            self._discard_spooled(spool_name)
            log.warning("index_refused_values", error=describe_error(exc))
            return StoreResult(
                Status.CANNOT_UNDERSTAND, error_comment="attribute values cannot be indexed"
            )
        except SQLAlchemyError as exc:
            self._discard_spooled(spool_name)
            log.error("index_write_failed", error=describe_error(exc))
            return StoreResult(Status.OUT_OF_RESOURCES, error_comment="index database unavailable")

        destinations: Mapping[str, str] = {}
        if result.outcome is not RecordOutcome.DUPLICATE:
            destinations = record.destinations
            self.on_stored(destinations)
        elif result.spool_file_adopted:
            log.warning("spool_file_restored", sop_instance_uid=record.attributes.sop_instance_uid)
            self.on_stored({})
        else:
            self._discard_spooled(spool_name)
        return StoreResult(
            Status.SUCCESS,
            outcome=result.outcome,
            size=record.size,
            version=result.version,
            attributes=record.attributes,
            destinations=destinations,
        )

    def _discard_spooled(self, spool_name: str | None) -> None:
        if spool_name is not None:
            self.spool.discard(spool_name)

    def _commit(self, record: InstanceRecord) -> repository.RecordResult:
        """Record the instance, in a transaction shared with the instances other
        associations are committing at the same moment (:mod:`gateway.group_commit`).

        Returns only once that transaction is committed. Failures before COMMIT leave
        nothing behind; a failing COMMIT raises :class:`_CommitUncertainError` because it
        may have been applied.
        """
        return self._group.submit(record)

    def _commit_batch(
        self, records: Sequence[InstanceRecord]
    ) -> list[repository.RecordResult | BaseException]:
        """One transaction for *records*.

        Failing to connect or to begin is not about any one record (database
        unavailable, write lock timed out): that error is every record's answer, without
        trying them one by one. A statement failing is treated as one record's problem
        (a value the database refuses, a unique-index race, a row lock timing out, a
        deadlock, a bug): the batch is rolled back and each record is committed on its
        own, so each gets its own answer and the others are not failed with it.
        """
        if len(records) == 1:
            return [_outcome_of(self._commit_one, records[0])]
        try:
            with self._connection.connection() as connection:
                together = self._commit_together(connection, records)
        except SQLAlchemyError as exc:  # connecting or beginning: every record's answer
            return [exc] * len(records)
        if together is not None:
            return together
        return [_outcome_of(self._commit_one, record) for record in records]

    def _commit_together(
        self, connection: Connection, records: Sequence[InstanceRecord]
    ) -> list[repository.RecordResult | BaseException] | None:
        """*records* in one transaction; None when a statement failed (rolled back)."""
        transaction = connection.begin()
        try:
            results: list[repository.RecordResult | BaseException] = [
                repository.record_instance(connection, record, self._spool_file_exists)
                for record in records
            ]
        except Exception:  # noqa: BLE001 - each record is retried for its own answer
            with contextlib.suppress(SQLAlchemyError):
                transaction.rollback()
            return None
        try:
            transaction.commit()
        except SQLAlchemyError as exc:
            # Whatever state the failed COMMIT left the driver in (SQLite may still be
            # in the transaction, holding the write lock), the connection is not kept.
            with contextlib.suppress(SQLAlchemyError):
                connection.invalidate()
            return [_uncertain(exc) for _ in records]
        return results

    def _spool_file_exists(self, name: str) -> bool:
        return self.spool.path(name).exists()

    def _commit_one(self, record: InstanceRecord) -> repository.RecordResult:
        """Record one instance in its own transaction. A concurrent association (another
        node on PostgreSQL) may insert the same new SOP instance between our check and
        our insert: the unique index stops it and the retry sees its row."""
        fresh = False
        for attempt in range(3):
            with self._connection.connection(fresh=fresh) as connection:
                transaction = connection.begin()
                try:
                    result = repository.record_instance(
                        connection, record, self._spool_file_exists
                    )
                except IntegrityError:
                    transaction.rollback()
                    if attempt == 2:
                        raise
                    continue
                except DBAPIError as exc:
                    transaction.rollback()
                    if not exc.connection_invalidated or fresh:
                        raise
                    # The kept connection was lost since its last use (a database
                    # restart): nothing was written on it. Once more, on a fresh one.
                    fresh = True
                    continue
                except BaseException:
                    transaction.rollback()
                    raise
                try:
                    transaction.commit()
                except SQLAlchemyError as exc:
                    raise _uncertain(exc) from exc
                return result
        raise AssertionError("unreachable")

    def _read(self, received: ReceivedInstance, sender: Sender) -> InstanceRecord:
        """Read the header and checksum of the received object (never the pixel data)."""
        document = is_document(received.sop_class_uid)  # the data set's, once checked
        if received.content is not None:
            content = memoryview(received.content)
            parsed = self._parse(content, received, sender)
            if received.digests is not None:
                digest, sha1 = received.digests
            else:
                whole = hashlib.sha1(content) if document else None  # noqa: S324 - FHIR Attachment.hash
                digest = hashlib.sha256(content[parsed.offset:]).hexdigest()
                sha1 = whole.hexdigest() if whole else None
            return self._record(received, sender, parsed, size=len(content),
                                sha256=digest, sha1=sha1)
        assert received.path is not None
        with received.path.open("rb") as stream:
            size = stream.seek(0, 2)
            if size == 0:
                raise _RefusedError(Status.CANNOT_UNDERSTAND, "empty dataset")
            with mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                parsed = self._parse(mapped, received, sender)
            if received.digests is not None:
                digest, sha1 = received.digests
            else:
                digest, sha1 = _digests(stream, parsed.offset, size, with_sha1=document)
        return self._record(received, sender, parsed, size=size, sha256=digest, sha1=sha1)

    def _parse(
        self, buffer: mmap.mmap | memoryview, received: ReceivedInstance, sender: Sender
    ) -> _Parsed:
        """The indexed attributes, data set offset and routing of a Part 10 object."""
        routing = self._routing
        try:
            offset = received.dataset_offset
            if offset is None:
                _, offset = read_file_meta(buffer)
            header = read_header(
                buffer, offset, dataset_encoding(received.transfer_syntax_uid),
                routing.header_tags,
            )
            attributes = extract_attributes(header)
        except (HeaderError, InvalidInstanceError) as exc:
            comment = f"cannot read dataset: {exc}"
            raise _RefusedError(Status.CANNOT_UNDERSTAND, comment) from exc
        if offset >= len(buffer):
            raise _RefusedError(Status.CANNOT_UNDERSTAND, "empty dataset")
        _check_matches_request(attributes, received)
        decision = routing.router(header, sender) if routing.router else None
        return _Parsed(attributes, offset, decision)

    def _record(
        self, received: ReceivedInstance, sender: Sender, parsed: _Parsed, *,
        size: int, sha256: str, sha1: str | None,
    ) -> InstanceRecord:
        decision = parsed.decision
        return InstanceRecord(
            attributes=parsed.attributes,
            transfer_syntax_uid=received.transfer_syntax_uid,
            size=size,
            dataset_offset=parsed.offset,
            sha256=sha256,
            sha1=sha1,
            spool_name=None,
            received_by=self.node_name,
            calling_ae=sender.calling_ae,
            called_ae=sender.called_ae,
            association_id=sender.association_id,
            received_at=self.clock(),
            destinations=dict(decision.destinations) if decision else {},
            route_morphs={
                name: morph.model_dump_json() for name, morph in decision.morphs.items()
            } if decision else {},
            routed=not decision.unrouted if decision else None,
        )


def _uncertain(cause: SQLAlchemyError) -> _CommitUncertainError:
    error = _CommitUncertainError()
    error.__cause__ = cause
    return error


def _outcome_of(
    commit: Callable[[InstanceRecord], repository.RecordResult], record: InstanceRecord
) -> repository.RecordResult | BaseException:
    try:
        return commit(record)
    except Exception as exc:  # noqa: BLE001 - handed to the record's own submitter
        return exc


def _digests(
    stream: BufferedReader, offset: int, size: int, *, with_sha1: bool
) -> tuple[str, str | None]:
    """SHA-256 of the dataset (from *offset*) and, for documents, SHA-1 of the whole file
    of *size* bytes (FHIR attachments use SHA-1). Read in chunks: a mapping would count
    in RSS. The buffer is no larger than what there is to read (zeroing a whole chunk
    cost more than hashing a small instance)."""
    digest = hashlib.sha256()
    whole = hashlib.sha1() if with_sha1 else None  # noqa: S324 - required by FHIR Attachment.hash
    position = 0 if whole else offset
    buffer = bytearray(min(_HASH_CHUNK, max(1, size - position)))
    view = memoryview(buffer)
    stream.seek(position)
    while count := stream.readinto(buffer):
        chunk = view[:count]
        if whole is not None:
            whole.update(chunk)
        start = max(0, offset - position)
        if start < count:
            digest.update(chunk[start:])
        position += count
    return digest.hexdigest(), whole.hexdigest() if whole else None


def _check_matches_request(attributes: InstanceAttributes, received: ReceivedInstance) -> None:
    if attributes.sop_instance_uid != received.sop_instance_uid:
        raise _RefusedError(
            Status.CANNOT_UNDERSTAND,
            "SOP Instance UID in the dataset differs from the C-STORE request",
        )
    if attributes.sop_class_uid != received.sop_class_uid:
        raise _RefusedError(
            Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
            "SOP Class UID in the dataset differs from the C-STORE request",
        )
