"""The DICOM listener: pynetdicom wiring for association control and C-STORE/C-ECHO.

This module is the thin network edge. Acceptance decisions live in ``acceptance``,
durability in ``ingest``; here we translate pynetdicom events into those calls and
write the association log.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import structlog
from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom import dimse_messages as _dimse_messages
from pynetdicom.pdu_primitives import A_RELEASE
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification
from pynetdicom.transport import AssociationSocket
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from gateway import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    dimse_codec,
    dimse_reactor,
    store_lane,
)
from gateway.acceptance import (
    AcceptancePolicy,
    AssociationRequest,
    Rejection,
    decide,
    spool_full,
    too_many_associations,
)
from gateway.config import NodeConfig
from gateway.dicom import skip_value_validation_on_read
from gateway.dicom.transfer_syntax import ACCEPTED_TRANSFER_SYNTAXES
from gateway.dimse_codec import ERROR_COMMENT_MAX
from gateway.index import repository
from gateway.index.database import describe_error
from gateway.index.repository import AssociationFacts, AssociationTotals, RecordOutcome
from gateway.ingest import Ingestor, ReceivedInstance, Sender, StoreResult
from gateway.logs import failure_fields, get_logger
from gateway.metrics import Metrics
from gateway.status import Status

log = get_logger(__name__)

_PROTOCOL_HEADROOM = 64
"""Associations pynetdicom may hold beyond ``max_associations``: those being rejected."""

STORAGE_SOP_CLASSES = frozenset(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts)
ACCEPTED_ABSTRACT_SYNTAXES = STORAGE_SOP_CLASSES | {str(Verification)}
_ACCEPTED_TS = frozenset(ACCEPTED_TRANSFER_SYNTAXES)
_STORE_AT_STOP_WAIT = 15.0
"""Seconds a stop waits for instances still being stored once their associations are
aborted (a storage call ends within the index's timeouts)."""

_receive_dir: Path | None = None


def _receive_tempfile(*args: Any, **kwargs: Any) -> Any:
    # pynetdicom writes each incoming dataset to a NamedTemporaryFile; put it in the
    # spool's incoming/ directory so that making it durable is a same-disk rename.
    kwargs.setdefault("dir", _receive_dir)
    return tempfile.NamedTemporaryFile(*args, **kwargs)


_max_pdu_read = 16 * 1024 * 1024 + 6


def _bounded_recv(self: AssociationSocket, nr_bytes: int) -> bytearray:
    """Read *nr_bytes* from the association's socket (pynetdicom's ``recv``, faster).

    pynetdicom reads a whole PDU into memory with the length the peer announces and
    does not check it against the maximum it advertised. A longer announcement is
    treated as a broken connection (the association is aborted) instead. The bytes are
    received straight into one buffer, not 4 KiB at a time: a 16 KiB PDU was four
    reads and four copies, and a large PDU hundreds. As in pynetdicom, a connection
    closed by the peer returns what was read so far.
    """
    if nr_bytes > _max_pdu_read:
        raise OSError(f"peer announced a {nr_bytes}-byte PDU, above the accepted maximum")
    sock = cast(socket.socket, self.socket)
    buffer = bytearray(nr_bytes)
    view = memoryview(buffer)
    received = 0
    while received < nr_bytes:
        count = sock.recv_into(view[received:])
        if not count:
            del view
            del buffer[received:]
            return buffer
        received += count
    return buffer


def configure_pynetdicom(receive_dir: Path, max_pdu_length: int) -> None:
    """Process-wide pynetdicom settings the receive path relies on."""
    global _receive_dir, _max_pdu_read  # noqa: PLW0603 - pynetdicom's settings are process-wide
    _receive_dir = receive_dir
    # Our peers may round up or use a larger PDU than announced by a few bytes; anything
    # beyond twice the maximum is not a DICOM peer doing its job.
    _max_pdu_read = max(_max_pdu_read, 2 * max_pdu_length)
    AssociationSocket.recv = _bounded_recv
    # Stream each dataset to a file as it arrives: memory does not grow with its size.
    _config.STORE_RECV_CHUNKED_DATASET = True
    _config.STORE_SEND_CHUNKED_DATASET = True
    # pynetdicom's standard handlers log every PDU and may log identifiers (PHI).
    _config.LOG_HANDLER_LEVEL = "none"
    _dimse_messages.NamedTemporaryFile = _receive_tempfile
    # Wake pynetdicom's reactor loops on work instead of polling every millisecond.
    dimse_reactor.install()
    # Encode the file meta group and the C-STORE-RSP directly, not through pydicom.
    dimse_codec.install()
    skip_value_validation_on_read()
    # Established associations' C-STOREs received and answered on their DUL thread.
    store_lane.install()


class PynetdicomContext(logging.Filter):
    """Gives pynetdicom's own log lines the peer and association they belong to, and
    drops a line that only repeats the previous one of the same connection (a peer
    sending garbage makes pynetdicom log one error per PDU it tries to read)."""

    def __init__(self, sessions: dict[Any, _Session]) -> None:
        super().__init__()
        self._sessions = sessions
        self._last: dict[int, str] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("pynetdicom"):
            return True
        thread = threading.current_thread()
        assoc = thread if hasattr(thread, "requestor") else getattr(thread, "assoc", None)
        if assoc is None:
            return True
        requestor = getattr(assoc, "requestor", None)
        address = getattr(requestor, "address", None)
        if address:
            record.peer_address = address
        session = self._sessions.get(assoc)
        if session is not None:
            record.assoc_id = session.facts.association_id
        message = record.getMessage()
        key = id(assoc)
        if self._last.get(key) == message:
            return False
        if len(self._last) > 1000:
            self._last.clear()
        self._last[key] = message
        return True


def negotiable_contexts(requested: list[PresentationContext]) -> list[PresentationContext]:
    """Contexts to accept for a request: known storage SOP classes and Verification, with
    the requestor's transfer syntaxes in the requestor's order of preference (so we never
    make a sender convert, and store exactly what it has)."""
    contexts: dict[str, PresentationContext] = {}
    for proposed in requested:
        abstract = str(proposed.abstract_syntax)
        if abstract not in ACCEPTED_ABSTRACT_SYNTAXES:
            continue
        context = contexts.get(abstract)
        if context is None:
            context = PresentationContext()
            context.abstract_syntax = abstract
            contexts[abstract] = context
        for syntax in proposed.transfer_syntax:
            if str(syntax) in _ACCEPTED_TS and syntax not in context.transfer_syntax:
                context.add_transfer_syntax(syntax)
    return [cx for cx in contexts.values() if cx.transfer_syntax]


def _provider_rejection(assoc: Any) -> Rejection:
    """The A-ASSOCIATE-RJ pynetdicom itself sent on *assoc*."""
    primitive = assoc.acceptor.primitive
    return Rejection(
        int(primitive.result),
        int(primitive.result_source),
        int(primitive.diagnostic),
        "rejected by the DICOM upper layer",
    )


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass
class _Session:
    """Book-keeping for one accepted association."""

    facts: AssociationFacts
    started: float = field(default_factory=time.monotonic)
    # Held while the association row is written, so an abort that races the accept
    # (a peer that connects and drops at once) still closes the row it finds.
    lock: threading.Lock = field(default_factory=threading.Lock)
    received: int = 0
    failed: int = 0
    duplicates: int = 0
    new_versions: int = 0
    unrouted: int = 0
    bytes: int = 0
    destinations: set[str] = field(default_factory=set)
    """Where the association's instances were routed."""
    recorded: bool = False
    finished: bool = False
    release_answered: bool = False
    """A-RELEASE-RP queued: a connection closed from now on ends a released association."""

    def count(self, result: StoreResult) -> None:
        if not result.ok:
            self.failed += 1
            return
        self.received += 1
        self.bytes += result.size
        if result.outcome is RecordOutcome.DUPLICATE:
            self.duplicates += 1
            return
        if result.outcome is RecordOutcome.NEW_VERSION:
            self.new_versions += 1
        if not result.destinations:
            self.unrouted += 1
        self.destinations.update(result.destinations)

    def totals(self) -> AssociationTotals:
        return AssociationTotals(
            instances_received=self.received,
            instances_failed=self.failed,
            duplicates=self.duplicates,
            new_versions=self.new_versions,
            bytes_received=self.bytes,
        )


class Receiver:
    """The node's Storage SCP: accepts associations and hands instances to the ingestor."""

    def __init__(
        self,
        config: NodeConfig,
        policy: AcceptancePolicy,
        ingestor: Ingestor,
        engine: Engine,
        node_name: str,
        *,
        metrics: Metrics | None = None,
        on_ended: Callable[[Collection[str]], None] | None = None,
    ) -> None:
        self.config = config
        self.on_ended = on_ended or (lambda destinations: None)
        """Called with the destinations an association's instances were routed to when
        it has ended: all it brought is in the index (their forwarders need not wait for
        more of its studies)."""
        self.metrics = metrics or Metrics()
        self.policy = policy
        self.ingestor = ingestor
        self.engine = engine
        self.node_name = node_name
        self._sessions: dict[Any, _Session] = {}
        self._lock = threading.Lock()
        self._server: Any = None
        self._ae: Any = None
        self._log_filter = PynetdicomContext(self._sessions)
        self._storing = 0
        self._stored = threading.Condition()

    # --- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Bind the port and start accepting associations (returns immediately)."""
        configure_pynetdicom(self.ingestor.spool.incoming, self.config.max_pdu_length)
        ae = AE(ae_title=self.config.ae_title)
        ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        ae.maximum_pdu_size = self.config.max_pdu_length
        ae.acse_timeout = self.config.acse_timeout
        ae.dimse_timeout = self.config.dimse_timeout
        ae.network_timeout = self.config.network_timeout
        # The limit is enforced in _on_requested, where the rejection is recorded before
        # the A-ASSOCIATE-RJ goes out; pynetdicom's own check (which reports it after the
        # peer may already have hung up) is kept out of the way.
        ae.maximum_associations = self.config.max_associations + _PROTOCOL_HEADROOM
        ae.require_called_aet = False  # decided in _on_requested, with a log line
        ae.add_supported_context(Verification)
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected_by_provider),
            (evt.EVT_C_STORE, self._on_c_store),
            (evt.EVT_C_ECHO, self._on_c_echo),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ACSE_SENT, self._on_acse_sent),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_connection_closed),
        ]
        self._ae = ae
        for handler in logging.getLogger().handlers:
            handler.addFilter(self._log_filter)
        self._server = ae.start_server(
            (self.config.host, self.config.port), block=False, evt_handlers=handlers
        )
        log.info(
            "listening",
            ae_title=self.config.ae_title,
            host=self.config.host,
            port=self.port,
        )

    @property
    def port(self) -> int:
        """The bound TCP port (useful when configured as 0)."""
        return int(self._server.server_address[1]) if self._server else self.config.port

    def reap(self) -> int:
        """Finish sessions whose association thread died without telling us (e.g. an I/O
        error inside pynetdicom's reader), removing their partial files."""
        with self._lock:
            dead = [assoc for assoc in self._sessions if not assoc.is_alive()]
        for assoc in dead:
            self._finish(assoc, "aborted", detail="association thread ended unexpectedly")
        return len(dead)

    def active_associations(self) -> int:
        return len(self._server.active_associations) if self._server else 0

    def stop(self, timeout: float) -> None:
        """Stop accepting, let in-flight associations finish for *timeout* s, abort the rest."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.shutdown()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(
            assoc.is_established for assoc in server.active_associations
        ):
            time.sleep(0.05)
        remaining = server.active_associations
        aborted = 0
        aborts: list[tuple[Any, threading.Thread]] = []
        for assoc in remaining:
            assoc_id = self._assoc_id(assoc)
            if assoc_id is not None:  # not a bare connection that never asked for anything
                log.warning("association_aborted_at_stop", assoc_id=assoc_id)
                aborted += 1
            # An abort waits for the association's DUL thread, which may be storing an
            # instance (store_lane): all are aborted at once, and waited for below
            # within the same bound. An instance still being stored is not answered.
            abort = threading.Thread(target=assoc.abort, name="abort-at-stop", daemon=True)
            abort.start()
            aborts.append((assoc, abort))
        # Aborted associations end promptly, and one released just now is still writing
        # its association log: both are waited for. A bare connection (a port probe, a
        # health check) waits for an A-ASSOCIATE-RQ until its ACSE timeout, even after
        # its peer has closed: it holds nothing and is not waited for.
        requested = [(assoc, abort) for assoc, abort in aborts
                     if assoc.requestor.primitive is not None]
        give_up = time.monotonic() + 2.0
        for waited in (thread for pair in requested for thread in pair):
            waited.join(timeout=max(0.0, give_up - time.monotonic()))
        # What the node closes next (the spool, the index connections) must not go away
        # under an instance still being stored; a storage call ends within the index's
        # own timeouts.
        with self._stored:
            if not self._stored.wait_for(lambda: self._storing == 0, _STORE_AT_STOP_WAIT):
                log.warning("instances_still_being_stored_at_stop", count=self._storing)
        idle = len(aborts) - len(requested)
        for handler in logging.getLogger().handlers:
            handler.removeFilter(self._log_filter)
        log.info("listener_stopped", aborted=aborted, idle_connections_closed=idle)

    # --- association control ---------------------------------------------------------

    def _assoc_id(self, assoc: Any) -> str | None:
        session = self._sessions.get(assoc)
        return session.facts.association_id if session and not session.finished else None

    def _on_requested(self, event: Any) -> None:
        assoc = event.assoc
        primitive = assoc.requestor.primitive
        facts = AssociationFacts(
            association_id=str(uuid.uuid4()),
            node=self.node_name,
            calling_ae=str(primitive.calling_ae_title).strip(),
            called_ae=str(primitive.called_ae_title).strip(),
            peer_address=str(assoc.requestor.address),
            peer_port=int(assoc.requestor.port),
            requested_at=_utcnow(),
        )
        structlog.contextvars.bind_contextvars(
            assoc_id=facts.association_id, calling_ae=facts.calling_ae
        )
        log.info(
            "association_requested",
            called_ae=facts.called_ae,
            peer_address=facts.peer_address,
            peer_port=facts.peer_port,
            contexts_proposed=len(assoc.requestor.requested_contexts),
        )
        session = _Session(facts)
        with self._lock:
            self._sessions[assoc] = session
            active = sum(1 for other in self._sessions.values() if not other.finished)
        rejection = decide(
            AssociationRequest(facts.calling_ae, facts.called_ae, facts.peer_address), self.policy
        )
        if rejection is None and active > self.config.max_associations:
            rejection = too_many_associations(self.config.max_associations)
        if rejection is None and not self.ingestor.spool.has_room():
            # Refuse before any data arrives: a full disk mid-dataset cannot be answered.
            rejection = spool_full()
        if rejection is not None:
            # Recorded before it is sent: the peer may close the connection as soon as
            # it reads the A-ASSOCIATE-RJ, and that must not be logged as an abort.
            self._record_rejection(session, rejection)
            assoc.acse.send_reject(rejection.result, rejection.source, rejection.diagnostic)
            # As pynetdicom does for its own rejections: wait until the A-ASSOCIATE-RJ
            # has gone out before the connection is closed.
            assoc.kill()
            return
        assoc.acceptor.supported_contexts = negotiable_contexts(assoc.requestor.requested_contexts)
        store_lane.attach(assoc, store_lane.StoreLane(
            self.ingestor.spool.incoming,
            functools.partial(self._store, assoc),
            {"assoc_id": facts.association_id, "calling_ae": facts.calling_ae},
            in_memory_max=self.ingestor.in_index_max_bytes,
        ))

    def _on_rejected_by_provider(self, event: Any) -> None:
        # pynetdicom's own rejections (an unsupported application context, or its
        # association limit should the headroom ever be exhausted).
        session = self._sessions.get(event.assoc)
        if session is None:
            return
        self._record_rejection(session, _provider_rejection(event.assoc))

    def _record_rejection(self, session: _Session, rejection: Rejection) -> None:
        with session.lock:
            if session.finished:
                return
            session.finished = True
        self.metrics.associations.labels(session.facts.calling_ae, "rejected").inc()
        log.warning(
            "association_rejected",
            assoc_id=session.facts.association_id,
            calling_ae=session.facts.calling_ae,
            reason=rejection.reason,
            result=rejection.result,
            source=rejection.source,
            diagnostic=rejection.diagnostic,
            peer_address=session.facts.peer_address,
            called_ae=session.facts.called_ae,
        )
        self._write_log(
            lambda c: repository.insert_association(
                c, session.facts, "rejected", rejection.reason, ended_at=_utcnow()
            )
        )

    def _on_accepted(self, event: Any) -> None:
        session = self._sessions.get(event.assoc)
        if session is None:
            return
        accepted = event.assoc.accepted_contexts
        log.info(
            "association_accepted",
            contexts_accepted=len(accepted),
            contexts_rejected=len(event.assoc.rejected_contexts),
        )
        with session.lock:
            if session.finished:
                return
            session.recorded = self._write_log(
                lambda c: repository.insert_association(c, session.facts, "established")
            )

    def _on_released(self, event: Any) -> None:
        self._finish(event.assoc, "released")

    def _on_aborted(self, event: Any) -> None:
        self._finish(event.assoc, "aborted")

    def _on_acse_sent(self, event: Any) -> None:
        primitive = event.primitive
        if isinstance(primitive, A_RELEASE) and primitive.result is not None:
            session = self._sessions.get(event.assoc)
            if session is not None:
                session.release_answered = True

    def _on_connection_closed(self, event: Any) -> None:
        # The peer closes the connection once it has our A-RELEASE-RP, which can be
        # before pynetdicom reports the release: that is a released association.
        session = self._sessions.get(event.assoc)
        if session is not None and session.release_answered:
            self._finish(event.assoc, "released")
            return
        # A peer that drops the TCP connection without A-RELEASE or A-ABORT.
        self._finish(event.assoc, "aborted", detail="connection closed by peer")

    def _finish(self, assoc: Any, outcome: str, detail: str | None = None) -> None:
        if outcome != "released":
            _discard_partial_dataset(assoc)
        with self._lock:
            session = self._sessions.pop(assoc, None)
        if session is None:
            return
        if getattr(assoc, "is_rejected", False):
            # pynetdicom rejected it and the peer closed before EVT_REJECTED was
            # handled: still a rejection (a no-op if it was recorded already).
            self._record_rejection(session, _provider_rejection(assoc))
            return
        with session.lock:
            if session.finished:
                return
            session.finished = True
            recorded = session.recorded
        self.metrics.associations.labels(session.facts.calling_ae, outcome).inc()
        duration = time.monotonic() - session.started
        log.info(
            f"association_{outcome}",
            assoc_id=session.facts.association_id,
            calling_ae=session.facts.calling_ae,
            peer_address=session.facts.peer_address,
            instances=session.received,
            failed=session.failed,
            duplicates=session.duplicates,
            new_versions=session.new_versions,
            unrouted=session.unrouted,
            bytes=session.bytes,
            duration_s=round(duration, 3),
            detail=detail,
        )
        ended_at = _utcnow()

        def write(connection: Any) -> None:
            # A peer that aborts right after the A-ASSOCIATE-AC can be reported before
            # the acceptance is (another thread): the row is then written here, whole.
            if not recorded:
                repository.insert_association(connection, session.facts, outcome)
            repository.finish_association(
                connection,
                session.facts.association_id,
                outcome=outcome,
                totals=session.totals(),
                ended_at=ended_at,
                detail=detail,
            )

        self._write_log(write)
        if session.destinations:
            self.on_ended(sorted(session.destinations))

    def _write_log(self, write: Any) -> bool:
        try:
            with self.engine.begin() as connection:
                write(connection)
        except SQLAlchemyError as exc:
            log.error("association_log_write_failed", error=describe_error(exc))
            return False
        return True

    # --- DIMSE services --------------------------------------------------------------

    def _on_c_echo(self, event: Any) -> int:
        log.debug("c_echo")
        return int(Status.SUCCESS)

    def _on_c_store(self, event: Any) -> Dataset | int:
        request = event.request
        path = getattr(request, "_dataset_path", None)
        if path is None:
            return _status_dataset(Status.CANNOT_UNDERSTAND, "C-STORE without a data set")
        status, comment = self._store(event.assoc, ReceivedInstance(
            path=Path(path),
            sop_class_uid=str(request.AffectedSOPClassUID),
            sop_instance_uid=str(request.AffectedSOPInstanceUID),
            transfer_syntax_uid=str(event.context.transfer_syntax),
        ))
        return _status_dataset(Status(status), comment) if comment else status

    def _store(self, assoc: Any, received: ReceivedInstance) -> tuple[int, str | None]:
        """Store an instance received on *assoc* (from pynetdicom's C-STORE event or the
        association's :mod:`~gateway.store_lane`); the status and error comment to send."""
        session = self._sessions.get(assoc)
        facts = session.facts if session else None
        sender = Sender(
            calling_ae=facts.calling_ae if facts else "",
            called_ae=facts.called_ae if facts else self.config.ae_title,
            association_id=facts.association_id if facts else None,
            peer_address=facts.peer_address if facts else "",
        )
        started = time.perf_counter()
        with self._stored:
            self._storing += 1
        try:
            result = self.ingestor.store(received, sender)
        except Exception as exc:  # noqa: BLE001 - answered 0x0110, logged without the message
            log.error("c_store_internal_error", sop_instance_uid=received.sop_instance_uid,
                      **failure_fields(exc))
            received.discard()
            result = StoreResult(Status.PROCESSING_FAILURE, error_comment="internal error")
        finally:
            with self._stored:
                self._storing -= 1
                self._stored.notify_all()
        self.metrics.store_seconds.observe(time.perf_counter() - started)
        outcome = result.outcome.value if result.ok and result.outcome else "refused"
        self.metrics.instances.labels(sender.calling_ae, outcome).inc()
        if result.ok:
            self.metrics.bytes.inc(result.size)
        if session is not None:
            session.count(result)
        _log_store(result, received.sop_instance_uid)
        if result.error_comment and not result.ok:
            return int(result.status), result.error_comment[:ERROR_COMMENT_MAX]
        return int(result.status), None


def _discard_partial_dataset(assoc: Any) -> None:
    """Remove the file of a dataset whose transfer was cut off by an abort."""
    lane = store_lane.lane_of(assoc)
    if lane is not None:
        lane.discard_partial()
    message = getattr(getattr(assoc, "dimse", None), "message", None)
    path = getattr(message, "_data_set_path", None)
    if path is not None:
        Path(path).unlink(missing_ok=True)


def _log_store(result: StoreResult, sop_instance_uid: str) -> None:
    if not result.ok:
        log.warning(
            "instance_refused",
            sop_instance_uid=sop_instance_uid,
            status=f"0x{int(result.status):04X}",
            reason=result.error_comment,
        )
    elif result.outcome is RecordOutcome.NEW_VERSION:
        log.info("instance_new_version", sop_instance_uid=sop_instance_uid, version=result.version)
    elif result.outcome is RecordOutcome.DUPLICATE:
        log.info("instance_duplicate", sop_instance_uid=sop_instance_uid)
    else:
        log.debug(
            "instance_stored",
            sop_instance_uid=sop_instance_uid,
            study_instance_uid=result.attributes.study_instance_uid if result.attributes else None,
            bytes=result.size,
            destinations=sorted(result.destinations) or None,
        )


def _status_dataset(status: Status, comment: str) -> Dataset:
    dataset = Dataset()
    dataset.Status = int(status)
    dataset.ErrorComment = comment[:ERROR_COMMENT_MAX]
    return dataset
