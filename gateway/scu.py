"""The C-STORE SCU side of forwarding: one association to one destination.

An instance goes out exactly as stored (its file streamed from the spool or the object
store) when the destination accepts its transfer syntax and no morphing applies;
otherwise it is read, converted (decompressed to an uncompressed syntax the destination
accepts) and/or morphed in memory and encoded by pynetdicom.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.pdu_primitives import P_DATA
from sqlalchemy import Engine, select

from gateway import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, send_lane
from gateway.acceptance import describe_rejection
from gateway.config import DestinationConfig, MorphConfig
from gateway.index import orders, repository
from gateway.index.database import reading
from gateway.index.queue import ClaimedJob
from gateway.index.repository import SPOOLED, instance_table
from gateway.morph import apply_morph
from gateway.objectstore import ObjectStore, ObjectStoreError
from gateway.spool import Spool, content_path
from gateway.status import StatusCategory, classify, describe
from gateway.transfer import Mode, SendPlan, contexts_for, plan, syntax_name

_COPY_CHUNK = 1024 * 1024
_CONTENTS_READ_AHEAD = 32  # instances spooled in the index read in one query ...
_CONTENTS_READ_AHEAD_BYTES = 16 * 1024 * 1024  # ... and at most this many bytes of them
# P-DATA PDUs waiting to be sent, in bytes: bounds the memory a streamed file takes.
_SEND_WINDOW_BYTES = 4 * 1024 * 1024


class AssociationFailedError(Exception):
    """No association: refused, rejected, aborted or timed out (always transient)."""


class _SourceUnavailableError(Exception):
    """The instance's bytes cannot be read now."""


class _ConversionError(Exception):
    """The instance cannot be converted to what the destination accepts."""


class _SendStalledError(Exception):
    """The association stopped taking data in the middle of a message."""


class _SendWindow(queue.Queue[Any]):
    """An association's queue of primitives for pynetdicom's DUL thread to send, holding
    at most *window* P-DATA PDUs.

    pynetdicom cuts a file being sent into P-DATA PDUs as fast as the disk reads and
    queues them all: when the network is slower than the disk, a 300 MiB instance would
    end up in memory. Here the sending thread waits for room instead, for as long as the
    DUL thread lives and takes a PDU within *stall_seconds*.
    """

    def __init__(self, dul: Any, window: int, stall_seconds: float) -> None:
        super().__init__()
        self._dul = dul
        self._window = window
        self._stall_seconds = stall_seconds

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        if isinstance(item, P_DATA):  # never hold back A-ABORT or A-RELEASE
            with self.not_full:  # notified by every get()
                deadline = time.monotonic() + self._stall_seconds
                while self._qsize() >= self._window:
                    remaining = deadline - time.monotonic()
                    if not self._dul.is_alive():
                        raise _SendStalledError("the association ended while sending")
                    if remaining <= 0:
                        raise _SendStalledError(
                            f"the destination took no data for {self._stall_seconds:g} s")
                    self.not_full.wait(min(remaining, 0.5))
        super().put(item, block, timeout)


def _bound_sending(assoc: Any, stall_seconds: float) -> None:
    """Give an established association a :class:`_SendWindow` (while nothing is queued,
    so the DUL thread cannot be between looking at the old queue and taking from it)."""
    dul = assoc.dul
    if not dul.to_provider_queue.empty():
        return
    pdu_length = int(assoc.acceptor.maximum_length or 0)  # 0: the peer set no limit
    window = max(2, _SEND_WINDOW_BYTES // pdu_length) if pdu_length else 2
    dul.to_provider_queue = _SendWindow(dul, window, stall_seconds)


@dataclass(frozen=True, slots=True)
class SendResult:
    """A C-STORE response (``status``, classified), or why there was none."""

    status: int | None
    category: StatusCategory
    detail: str = ""
    note: str | None = None
    bytes_sent: int = 0


class DestinationLink:
    """An association to a destination and the instances sent over it."""

    def __init__(
        self,
        destination: DestinationConfig,
        calling_ae_title: str,
        spool: Spool,
        store: ObjectStore,
        engine: Engine,
    ) -> None:
        self.destination = destination
        self.calling_ae_title = destination.calling_ae_title or calling_ae_title
        self.spool = spool
        self.store = store
        self.engine = engine
        self.accepted: set[tuple[str, str]] = set()
        self.proposed: frozenset[tuple[str, str]] = frozenset()
        self._assoc: Any = None
        self._lane: send_lane.SendLane | None = None
        self._context_ids: dict[tuple[str, str], int] = {}
        self._upcoming: list[tuple[int, int]] = []
        self._contents: dict[int, bytes] = {}

    @property
    def established(self) -> bool:
        return self._assoc is not None and bool(self._assoc.is_established)

    def covers(self, items: list[tuple[str, str]]) -> bool:
        """Whether this open association negotiated every (SOP class, stored syntax) pair
        of *items*, so that what it accepted is the destination's answer for them."""
        return self.established and set(items) <= self.proposed

    def open(self, items: list[tuple[str, str]]) -> None:
        """Associate, proposing contexts for these (SOP class, stored syntax) pairs."""
        destination = self.destination
        ae = AE(ae_title=self.calling_ae_title)
        ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        ae.acse_timeout = ae.dimse_timeout = destination.timeout
        ae.connection_timeout = destination.timeout
        # No idle timeout on our own association: fetching, decompressing or morphing a
        # large instance between two C-STOREs must not abort it. Each response is still
        # bounded by the DIMSE timeout.
        ae.network_timeout = None
        for context in contexts_for(items, decompress=destination.decompress):
            ae.add_requested_context(context.abstract_syntax, list(context.transfer_syntaxes))
        connected, answered = threading.Event(), threading.Event()

        def on_pdu(_event: Any) -> None:
            answered.set()

        try:
            assoc = ae.associate(
                destination.host,
                destination.port,
                ae_title=destination.ae_title,
                max_pdu=destination.max_pdu_length,
                evt_handlers=[(evt.EVT_CONN_OPEN, lambda event: connected.set()),
                              (evt.EVT_PDU_RECV, on_pdu)],
            )
        except OSError as exc:  # e.g. a host name that does not resolve
            where = f"{destination.ae_title}@{destination.host}:{destination.port}"
            raise AssociationFailedError(f"cannot reach {where}: {exc}") from exc
        if not assoc.is_established:
            if assoc.rejected_contexts and not assoc.is_rejected:
                # The destination answered but accepted none of the contexts: nothing in
                # this batch can be sent as proposed (each job gets a permanent reason).
                self.accepted = set()
                return
            raise AssociationFailedError(
                self._failure_reason(assoc, connected.is_set(), answered.is_set()))
        # Only the negotiation is watched: every PDU of the association would call it.
        assoc.unbind(evt.EVT_PDU_RECV, on_pdu)
        _bound_sending(assoc, destination.timeout)
        self._assoc = assoc
        self._lane = send_lane.attach(assoc)
        self._context_ids = {
            (str(cx.abstract_syntax), str(cx.transfer_syntax[0])): int(cx.context_id)
            for cx in assoc.accepted_contexts if cx.as_scu
        }
        self.proposed = frozenset(items)
        self.accepted = {
            (str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts
        }

    def _failure_reason(self, assoc: Any, connected: bool, answered: bool) -> str:
        where = f"{self.destination.ae_title}@{self.destination.host}:{self.destination.port}"
        if not connected:
            # pynetdicom reports a refused TCP connection as an abort: say what happened.
            return f"could not connect to {where} (connection refused or timed out)"
        if not answered:
            # Also reported as an abort (ours, after the ACSE timeout), not the peer's.
            return (f"no answer from {where} to the association request within "
                    f"{self.destination.timeout:g} s")
        if assoc.is_rejected and assoc.acceptor.primitive is not None:
            rj = assoc.acceptor.primitive
            words = describe_rejection(int(rj.result), int(rj.result_source), int(rj.diagnostic))
            return f"association rejected by {where} ({words})"
        if assoc.is_aborted:
            return f"association aborted by {where}"
        return f"no association with {where} (the connection closed during negotiation)"

    def close(self) -> None:
        if self._assoc is None:
            return
        if self._assoc.is_established:
            self._assoc.release()
        self._assoc = None

    def expect(self, jobs: list[ClaimedJob]) -> None:
        """The jobs about to be sent, in order: the bytes of those spooled in the index
        are then read a few dozen at a time instead of one query per instance."""
        self._upcoming = [(job.instance_pk, job.size) for job in jobs
                          if job.spool_name is None and job.instance_state == SPOOLED]
        self._contents = {}

    def send(self, job: ClaimedJob, route_morph: MorphConfig | None) -> SendResult:
        """Send one instance; never raises for anything the destination or data did."""
        decision = plan(
            job.sop_class_uid, job.transfer_syntax_uid, self.accepted,
            decompress=self.destination.decompress,
        )
        if decision.mode is Mode.IMPOSSIBLE:
            return SendResult(None, StatusCategory.PERMANENT_FAILURE, decision.reason)
        if self._assoc is None or not self._assoc.is_established:
            return SendResult(None, StatusCategory.TRANSIENT_FAILURE, "association lost")
        morphs = [m for m in (route_morph, self.destination.morph) if m and not m.is_empty()]
        if self.destination.coerce_from_order:
            coercion = self._order_demographics(job.study_instance_uid)
            if coercion is not None:
                morphs.append(coercion)
        try:
            response, note = self._transmit(job, decision, morphs)
        except send_lane.SendLaneError as exc:
            # The lane's answer to a failure it cannot recover from, as pynetdicom's to
            # a DIMSE timeout: the association is not used any more.
            self._abort()
            return SendResult(None, StatusCategory.TRANSIENT_FAILURE,
                              f"no response from the destination ({exc})")
        except Exception as exc:  # noqa: BLE001 - every failure becomes the job's outcome
            return _failure(exc)
        if response is None:
            return SendResult(
                None, StatusCategory.TRANSIENT_FAILURE,
                "no response from the destination (timeout or association aborted)",
            )
        status, comment = response
        detail = describe(status) + (f": {comment}" if comment else "")
        return SendResult(status, classify(status), detail, note, job.size)

    def _transmit(
        self, job: ClaimedJob, decision: SendPlan, morphs: list[MorphConfig]
    ) -> tuple[tuple[int, str | None] | None, str | None]:
        """Send *job* as *decision* says; the response's (status, error comment), or None
        without a response, and a note on a conversion."""
        note = None
        with self._source(job) as path:
            if decision.mode is Mode.AS_STORED and not morphs:
                sent = self._send_through_lane(job, path)
                if sent is not None:
                    return (sent.status, sent.error_comment), note
                return _status_of(self._assoc.send_c_store(path)), note
            dataset = dcmread(path)
            if decision.mode is Mode.CONVERT:
                note = _convert(dataset, str(decision.transfer_syntax))
            for morph in morphs:
                apply_morph(dataset, morph)
            return _status_of(self._assoc.send_c_store(dataset)), note

    def _send_through_lane(self, job: ClaimedJob, path: Path) -> send_lane.StoreResponse | None:
        """Send the stored bytes as they are through the association's send lane; None
        when the lane does not take this instance (pynetdicom sends it)."""
        lane = self._lane
        context_id = self._context_ids.get((job.sop_class_uid, job.transfer_syntax_uid))
        if lane is None or context_id is None or job.dataset_offset <= 0:
            return None
        command = lane.command(job.sop_class_uid, job.sop_instance_uid)
        if command is None:
            return None
        return lane.send(context_id, command, job.sop_instance_uid, path,
                         offset=job.dataset_offset, length=job.size - job.dataset_offset,
                         timeout=self.destination.timeout)

    def _abort(self) -> None:
        assoc, self._assoc = self._assoc, None
        if assoc is not None:
            assoc.abort()

    @contextlib.contextmanager
    def _source(self, job: ClaimedJob) -> Iterator[Path]:
        """A path to the instance's stored bytes, valid while the block runs.

        The path is ``/proc/self/fd/N`` of a descriptor held open here, so the uploader
        may delete the spool file (or the bytes spooled in the index) meanwhile without
        pulling it from under the send.
        """
        with contextlib.ExitStack() as cleanup:
            yield self._source_path(job, cleanup)

    def _source_path(self, job: ClaimedJob, cleanup: contextlib.ExitStack) -> Path:
        if job.spool_name:
            fd = _open(self.spool.path(job.spool_name))
            if fd is not None:
                return _held(fd, cleanup)
        elif job.instance_state == SPOOLED:
            content = self._spooled_content(job.instance_pk)
            if content is not None:
                return cleanup.enter_context(content_path(content))
        # Not (or no longer: the uploader may have moved it after we claimed the job)
        # in the spool: the object store has it.
        key = job.object_key or self._object_key_now(job.instance_pk)
        if key is None:
            raise _SourceUnavailableError("instance is neither in the spool nor stored")
        local = self.store.local_path(key)
        if local is None:
            local = self._download(key)
            cleanup.callback(local.unlink, missing_ok=True)
        fd = _open(local)
        if fd is None:
            raise _SourceUnavailableError("instance file is missing")
        return _held(fd, cleanup)

    def _spooled_content(self, instance_pk: int) -> bytes | None:
        if instance_pk not in self._contents:
            # This one and the next few expected (a batch may be thousands).
            wanted = _read_ahead(self._upcoming, instance_pk)
            with reading(self.engine) as connection:
                self._contents = repository.spooled_contents(connection, wanted)
        return self._contents.pop(instance_pk, None)

    def _order_demographics(self, study_instance_uid: str) -> MorphConfig | None:
        """The matched order's patient demographics, as a morph of the forwarded copy."""
        with reading(self.engine) as connection:
            order = orders.order_for_study(connection, study_instance_uid)
        if order is None:
            return None
        values = {
            "PatientID": order.patient_id, "IssuerOfPatientID": order.issuer_of_patient_id,
            "PatientName": order.patient_name, "PatientBirthDate": order.patient_birth_date,
            "PatientSex": order.patient_sex,
        }
        present = {key: value for key, value in values.items() if value}
        return MorphConfig(set=present) if present else None

    def _object_key_now(self, instance_pk: int) -> str | None:
        with reading(self.engine) as connection:
            key = connection.execute(
                select(instance_table.c.object_key).where(instance_table.c.id == instance_pk)
            ).scalar_one_or_none()
        return str(key) if key else None

    def _download(self, key: str) -> Path:
        target = self.spool.root / "outgoing" / f"{uuid.uuid4().hex}.dcm"
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            stream = self.store.open(key)
            try:
                with target.open("wb") as out:
                    shutil.copyfileobj(stream, out, _COPY_CHUNK)
            finally:
                stream.close()
        except (ObjectStoreError, OSError) as exc:
            target.unlink(missing_ok=True)
            message = f"cannot read {key} from the object store: {exc}"
            raise _SourceUnavailableError(message) from exc
        return target


def _failure(exc: Exception) -> SendResult:
    """What an exception while sending means for the job.

    Reasons name the error type only: pydicom's messages quote attribute values.
    """
    if isinstance(exc, _ConversionError):
        return SendResult(None, StatusCategory.PERMANENT_FAILURE, str(exc))
    if isinstance(exc, InvalidDicomError):
        detail = "the stored object cannot be read as DICOM (InvalidDicomError)"
        return SendResult(None, StatusCategory.PERMANENT_FAILURE, detail)
    if isinstance(exc, (ValueError, AttributeError, TypeError, KeyError)):
        detail = f"the instance cannot be encoded for sending ({type(exc).__name__})"
        return SendResult(None, StatusCategory.PERMANENT_FAILURE, detail)
    # Unreadable source, lost connection, I/O: worth another try.
    return SendResult(None, StatusCategory.TRANSIENT_FAILURE, f"send failed: {exc}")


def _read_ahead(upcoming: list[tuple[int, int]], instance_pk: int) -> list[int]:
    """*instance_pk* and those after it in *upcoming* ((primary key, size) in sending
    order), at most :data:`_CONTENTS_READ_AHEAD` of them and as many bytes."""
    start = next((index for index, (pk, _) in enumerate(upcoming) if pk == instance_pk), None)
    if start is None:
        return [instance_pk]
    wanted: list[int] = []
    held = 0
    for pk, size in upcoming[start:start + _CONTENTS_READ_AHEAD]:
        if wanted and held + size > _CONTENTS_READ_AHEAD_BYTES:
            break
        wanted.append(pk)
        held += size
    return wanted


def _status_of(response: Dataset | None) -> tuple[int, str | None] | None:
    """The status and error comment of a response pynetdicom decoded (None: none)."""
    if response is None or "Status" not in response:
        return None
    comment = response.get("ErrorComment")
    return int(response.Status), str(comment) if comment else None


def _held(fd: int, cleanup: contextlib.ExitStack) -> Path:
    """A path to read the open descriptor *fd* from; *cleanup* closes it."""
    cleanup.callback(os.close, fd)
    return Path(f"/proc/self/fd/{fd}")


def _open(path: Path) -> int | None:
    try:
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None


def _convert(dataset: Dataset, target: str) -> str:
    """Make *dataset* encodable in the uncompressed *target* syntax; describe what changed."""
    stored = UID(str(dataset.file_meta.TransferSyntaxUID))
    if stored.is_compressed:
        try:
            dataset.decompress(generate_instance_uid=False)
        except Exception as exc:
            raise _ConversionError(
                f"cannot decompress {syntax_name(stored)} for a destination that accepts only "
                f"uncompressed data ({type(exc).__name__})"
            ) from exc
    target_uid = UID(target)
    dataset.file_meta.TransferSyntaxUID = target_uid
    dataset.set_original_encoding(target_uid.is_implicit_VR, target_uid.is_little_endian)
    return f"sent as {syntax_name(target)} (stored as {syntax_name(stored)})"
