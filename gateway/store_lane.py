"""The C-STORE lane: an established association's C-STOREs received, stored and
answered on its DUL thread, without pynetdicom's per-message machinery.

For every P-DATA-TF PDU pynetdicom builds PDU, PDV and primitive objects, hands them
through its state machine to the DIMSE provider, decodes the command set into a pydicom
dataset, converts it to a primitive with validated attributes, queues the message for
the association's own thread, wakes that thread, builds a response primitive there and
queues it back to the DUL thread to be encoded and sent. For a small instance that was
most of the listener's interpreter time outside the storage handler.

Once an association is accepted, the listener attaches a :class:`StoreLane` to it. Its
DUL thread then reads each PDU as pynetdicom does (same checks, same state machine
events for anything that is not data) and gives P-DATA-TF PDUs to the lane, which:

- takes a message whose command set arrives whole in one PDV and is a plain C-STORE-RQ
  (:func:`parse_store_command`) on an accepted context of the same SOP class: it puts
  the Part 10 preamble and file meta group, then each data fragment as it arrives, in
  memory while the object is small enough to be spooled in the index, and from the
  fragment that makes it larger in a file in the spool's ``incoming/`` directory;
- on the last fragment calls the listener's storage function (the same one pynetdicom's
  C-STORE event calls: durable, indexed, then a status) and sends the C-STORE-RSP itself;
- hands every other PDV to pynetdicom's DIMSE provider, one at a time, as pynetdicom's
  own P-DATA action would: C-ECHO, a command set split over several PDVs, a command set
  with elements outside the plain C-STORE shape, a message already started there.

A PDV that breaks PS3.8 inside a message the lane holds (a command fragment in the
middle of a data set, a data fragment for another context, a malformed item) is what
pynetdicom treats as an invalid PDU: the association is aborted (Evt19) and the partial
file removed. A spool write that fails mid-dataset does not abort: the rest of the data
set is read and discarded and the C-STORE is answered Out of Resources. Nothing else
about the association changes: negotiation, release, abort, timers and the association
thread stay pynetdicom's.

The lane is used only with the pynetdicom versions it was tested with
(:data:`gateway.dimse_reactor.SUPPORTED_VERSIONS`) and only when no handler is bound to
the PDU, data, DIMSE-message or state-machine events it bypasses.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import os
import select
import ssl
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pynetdicom
import structlog
from pynetdicom import association as _association
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

from gateway.dicom.attributes import is_document
from gateway.dimse_codec import (
    ERROR_COMMENT_MAX,
    c_store_rsp_command,
    file_meta_bytes,
    fits,
    p_data_tf,
    plain_uids,
    send_pdv,
)
from gateway.dimse_reactor import attach_lane, install_lanes
from gateway.dimse_reactor import lane_of as dul_lane_of
from gateway.ingest import ReceivedInstance
from gateway.logs import failure_fields, get_logger
from gateway.spool import start_writeback
from gateway.status import Status

log = get_logger(__name__)

_PREAMBLE = b"\x00" * 128 + b"DICM"
_PDU_TYPES = frozenset(range(0x01, 0x08))
_P_DATA_TF = 0x04
_COMMAND = 0x01
_LAST = 0x02
_C_STORE_RQ = 0x0001
_NO_DATA_SET = 0x0101
_SERVED_WAIT = 0.05  # seconds the lane waits for pynetdicom to finish a message
_FOLLOWING_PDUS = 64  # PDUs of one message read without returning to the reactor
_ESTABLISH_WAIT = 10.0  # ... and for it to finish accepting the association
WRITEBACK_BYTES = 128 * 1024
"""Written to a spool file before the kernel is asked to start writing it out."""
_HANDLER_FAILED = 0xC211  # what pynetdicom answers when the C-STORE handler raises
BYPASSED_EVENTS = (
    evt.EVT_PDU_RECV, evt.EVT_PDU_SENT, evt.EVT_DATA_RECV, evt.EVT_DATA_SENT,
    evt.EVT_DIMSE_RECV, evt.EVT_DIMSE_SENT, evt.EVT_FSM_TRANSITION,
)
_US_ELEMENTS = frozenset({0x0100, 0x0110, 0x0700, 0x0800, 0x1031})
_COMMAND_ELEMENTS = _US_ELEMENTS | {0x0000, 0x0002, 0x1000, 0x1030}

Serve = Callable[[ReceivedInstance], tuple[int, str | None]]
"""Stores a received instance; returns the status to answer and an error comment."""


@dataclass(frozen=True, slots=True)
class StoreCommand:
    """The parts of a plain C-STORE-RQ command set the lane needs."""

    message_id: int
    sop_class_uid: str
    sop_instance_uid: str


def parse_store_command(encoded: bytes | memoryview) -> StoreCommand | None:
    """A C-STORE-RQ with a data set, read from its command set (implicit VR little
    endian, PS3.7 E.1); None for anything else, which pynetdicom then decodes.

    "Anything else" is: another command, no data set, an element that is not part of a
    C-STORE-RQ (or appears twice), a missing required element, a value of the wrong
    size, a priority other than 0, 1 or 2, a UID that is not plain digits and dots, or
    an encoding that runs past its end. The Move Originator elements are allowed and not
    used; the group length is not checked (pynetdicom does not either).
    """
    view = memoryview(encoded)
    values: dict[int, bytes] = {}
    position, end = 0, len(view)
    while position < end:
        if end - position < 8:
            return None
        group, element, length = struct.unpack_from("<HHI", view, position)
        position += 8
        if (group != 0x0000 or element not in _COMMAND_ELEMENTS or element in values
                or length > end - position):
            return None
        values[element] = bytes(view[position:position + length])
        position += length
    numbers: dict[int, int] = {}
    for element in _US_ELEMENTS & values.keys():
        if len(values[element]) != 2:
            return None
        numbers[element] = struct.unpack("<H", values[element])[0]
    if (numbers.get(0x0100) != _C_STORE_RQ or 0x0110 not in numbers
            or numbers.get(0x0700) not in (0, 1, 2)
            or numbers.get(0x0800, _NO_DATA_SET) == _NO_DATA_SET):
        return None
    sop_class = _uid(values.get(0x0002))
    sop_instance = _uid(values.get(0x1000))
    if sop_class is None or sop_instance is None:
        return None
    return StoreCommand(numbers[0x0110], sop_class, sop_instance)


def _uid(value: bytes | None) -> str | None:
    if value is None:
        return None
    try:
        text = value.decode("ascii").rstrip("\x00 ")
    except UnicodeDecodeError:
        return None
    return text if plain_uids(text) else None


@dataclass(slots=True)
class _Message:
    """A C-STORE the lane is receiving."""

    context_id: int
    command: StoreCommand
    transfer_syntax: str
    path: Path | None = None
    fd: int | None = None
    error: str | None = None
    content: bytearray | None = None
    """The object so far, while it is held in memory (then *fd* and *path* are None)."""
    dataset_offset: int = 0
    """The length of the preamble and file meta group the lane wrote."""
    sha256: Any = field(default_factory=hashlib.sha256)
    """Of the data set, updated as its fragments arrive (it is not read back later)."""
    sha1: Any = None
    """Documents only: of the whole object (FHIR attachments use SHA-1)."""
    unflushed: int = 0
    """Bytes written to the file since the kernel was last asked to start writing it."""


class ProtocolError(Exception):
    """The peer broke PS3.8 inside a message the lane holds."""


def pdv_items(body: bytes | bytearray) -> Iterator[tuple[int, int, memoryview]]:
    """The presentation data value items of a P-DATA-TF PDU's *body* (PS3.8 9.3.5):
    context ID, message control header, and the PDV (control header then fragment).
    Raises :class:`ProtocolError` at an item that does not fit the PDU."""
    view = memoryview(body)
    position, end = 0, len(view)
    while position < end:
        if end - position < 6:
            raise ProtocolError("truncated presentation data value item")
        length = struct.unpack_from(">L", view, position)[0]
        if length < 2 or length > end - position - 4:
            raise ProtocolError("presentation data value item length out of range")
        yield view[position + 4], view[position + 5], view[position + 5:position + 4 + length]
        position += 4 + length


@dataclass
class StoreLane:
    """One association's lane. Everything but :meth:`discard_partial` runs on the
    association's DUL thread."""

    incoming: Path
    serve: Serve
    log_context: dict[str, str] = field(default_factory=dict)
    in_memory_max: int = 0
    """Bytes of an object held in memory (to be spooled in the index); beyond, a file."""
    served: int = 0
    """C-STOREs answered by the lane (for tests and diagnostics)."""
    _message: _Message | None = None
    _partial: Path | None = None
    _broken: bool = False
    _bound: bool = False
    _answered: int = 0
    """Messages pynetdicom's association thread has taken off its queue and finished
    serving."""
    _served: threading.Condition = field(default_factory=threading.Condition)
    settled: threading.Event = field(default_factory=threading.Event)
    """Set once pynetdicom has established, aborted or released the association."""

    # --- called from the DUL thread ------------------------------------------------------

    def takes(self, dul: Any) -> bool:
        """Whether the lane reads the next P-DATA-TF: the association is established
        (Sta6, and pynetdicom has finished accepting it: its association thread serves
        nothing before that either) and nothing received before it is still waiting for
        pynetdicom."""
        if self._broken or dul.state_machine.current_state != "Sta6":
            return False
        if self._message is not None:
            return True
        if not dul.assoc.is_established and not self._wait_established(dul):
            return False
        return bool(dul.event_queue.empty() and dul._recv_pdu.empty())

    def _wait_established(self, dul: Any) -> bool:
        """Wait for pynetdicom to finish accepting the association.

        A peer sends data only once it has our A-ASSOCIATE-AC, but pynetdicom calls the
        association established only after its acceptance handlers have returned (the
        listener writes the association's log row there). A message arriving in between
        would be pynetdicom's, served when that is done: the lane waits for the same
        moment instead, so an association carrying a single instance (common for
        modalities that open one per image) still takes the lane."""
        assoc = dul.assoc
        if assoc._kill or dul._kill_thread:
            return False
        self.settled.wait(_ESTABLISH_WAIT)
        return bool(assoc.is_established)

    def _on_settled(self, _event: Any) -> None:
        self.settled.set()

    def pynetdicom_served(self) -> None:
        """pynetdicom's association thread finished serving a message from its queue."""
        with self._served:
            self._answered += 1
            self._served.notify_all()

    def _pynetdicom_idle(self, dul: Any) -> bool:
        """Whether pynetdicom has served every message it queued (``unfinished_tasks``
        counts every message ever put on the queue: pynetdicom never calls
        ``task_done``). Until then the lane takes no new message: a peer that does not
        wait for each response (asynchronous operations are never negotiated) still
        gets them in order, and one association's C-STOREs are never stored at the
        same time.

        A peer that did wait may send its next request before the association thread
        has come back from serving the previous one (its response is already out): with
        nothing left in the queue, that is waited for, briefly."""
        messages = dul.assoc.dimse.msg_queue
        with self._served:
            return bool(not messages.qsize() and self._served.wait_for(
                lambda: messages.unfinished_tasks == self._answered, _SERVED_WAIT))

    def receive(self, dul: Any, body: bytearray) -> None:
        """Handle the PDV items of one P-DATA-TF PDU (*body*: the PDU after its header)."""
        try:
            for context_id, control, pdv in pdv_items(body):
                if self._message is not None:
                    self._data(dul, context_id, control, pdv[1:])
                elif not (control & _COMMAND and control & _LAST
                          and dul.assoc.dimse.message is None
                          and self._pynetdicom_idle(dul)
                          and self._start(dul, context_id, pdv[1:])):
                    self._to_pynetdicom(dul, context_id, pdv)
        except ProtocolError as exc:
            self._broken = True
            self.close()
            log.warning("dimse_protocol_error", reason=str(exc))
            dul.event_queue.put("Evt19")  # pynetdicom's invalid-PDU event: A-ABORT

    def _to_pynetdicom(self, dul: Any, context_id: int, pdv: memoryview) -> None:
        """Give one PDV (control header and fragment) to pynetdicom's DIMSE provider, as
        its P-DATA action (DT-2) would; a message it cannot decode aborts the
        association."""
        primitive = P_DATA()
        primitive.presentation_data_value_list.append((context_id, bytes(pdv)))
        try:
            dul.assoc.dimse.receive_primitive(primitive)
        except Exception as exc:
            raise ProtocolError("undecodable DIMSE message") from exc

    def bind_log_context(self) -> None:
        """Give the DUL thread's log lines the association's ID and calling AE."""
        if not self._bound:
            structlog.contextvars.bind_contextvars(**self.log_context)
            self._bound = True

    def reads_next_pdu(self) -> bool:
        return True

    def read_pdu(self, dul: Any) -> None:
        _read_pdu(dul, self)

    def holds_message(self) -> bool:
        """Whether a message the lane took is still being received."""
        return self._message is not None

    def close(self) -> None:
        """Remove the file of a message that did not complete (the association ended)."""
        message, self._message = self._message, None
        if message is not None:
            _drop_file(message)

    # --- called from any thread -------------------------------------------------------

    def discard_partial(self) -> None:
        """Remove the file being received, if any (the association was aborted)."""
        partial = self._partial
        if partial is not None:
            partial.unlink(missing_ok=True)

    # --- internals ------------------------------------------------------------------

    def _start(self, dul: Any, context_id: int, data: memoryview) -> bool:
        command = parse_store_command(data)
        if command is None:
            return False
        context = dul.assoc._accepted_cx.get(context_id)
        if (context is None or str(context.abstract_syntax) != command.sop_class_uid
                or not _is_storage(command.sop_class_uid)):
            return False  # pynetdicom answers (or aborts) as it always has
        syntax = str(context.transfer_syntax[0]) if context.transfer_syntax else ""
        if not plain_uids(syntax):
            return False
        content = bytearray(_PREAMBLE)
        content += file_meta_bytes(
            sop_class_uid=command.sop_class_uid,
            sop_instance_uid=command.sop_instance_uid,
            transfer_syntax=syntax,
            implementation_uid=pynetdicom.PYNETDICOM_IMPLEMENTATION_UID,
            implementation_version=pynetdicom.PYNETDICOM_IMPLEMENTATION_VERSION,
        )
        message = _Message(context_id, command, syntax, content=content,
                           dataset_offset=len(content))
        if is_document(command.sop_class_uid):
            message.sha1 = hashlib.sha1(content)  # noqa: S324 - required by FHIR Attachment.hash
        self._message = message
        if len(content) > self.in_memory_max:
            self._to_file(message, b"")
        return True

    def _to_file(self, message: _Message, data: memoryview | bytes) -> None:
        """Continue *message* in a file: what is held in memory, then *data*."""
        held, message.content = message.content, None
        try:
            fd, message.path = _create(self.incoming)
            message.fd = fd
            self._partial = message.path
            _write_all(fd, held or b"")
            if data:
                _write_all(fd, data)
        except OSError as exc:
            _failed(message, exc)

    def _data(self, dul: Any, context_id: int, control: int, data: memoryview) -> None:
        message = self._message
        assert message is not None
        if control & _COMMAND:
            raise ProtocolError("command fragment inside a data set")
        if context_id != message.context_id:
            raise ProtocolError("data fragment for another presentation context")
        message.sha256.update(data)
        if message.sha1 is not None:
            message.sha1.update(data)
        if message.content is not None:
            if len(message.content) + len(data) > self.in_memory_max:
                self._to_file(message, data)
            else:
                message.content += data
        elif message.fd is not None:
            try:
                _write_all(message.fd, data)
            except OSError as exc:
                _failed(message, exc)
            else:
                message.unflushed += len(data)
                if message.unflushed >= WRITEBACK_BYTES:
                    message.unflushed = 0
                    start_writeback(message.fd)
        if control & _LAST:
            self._message = None
            self._finish(dul, message)

    def _finish(self, dul: Any, message: _Message) -> None:
        if message.fd is not None:
            fd, message.fd = message.fd, None
            try:
                os.close(fd)
            except OSError as exc:
                _failed(message, exc)
        status, comment = int(Status.OUT_OF_RESOURCES), message.error
        # From here the file is the storage function's (it keeps or removes it): an
        # abort while it runs must not delete it under it.
        self._partial = None
        if message.error is None and (message.path is not None or message.content is not None):
            command = message.command
            # pynetdicom's association thread never checks the idle timer while its
            # handler runs; that thread is free now, so the timer waits with the handler.
            dul._idle_timer.restart()
            dul._idle_timer.stop()
            try:
                status, comment = self.serve(ReceivedInstance(
                    message.path, command.sop_class_uid, command.sop_instance_uid,
                    message.transfer_syntax, message.content, message.dataset_offset,
                    (message.sha256.hexdigest(),
                     message.sha1.hexdigest() if message.sha1 is not None else None),
                ))
            except Exception as exc:  # noqa: BLE001 - answered as pynetdicom answers it
                log.error("c_store_internal_error",
                          sop_instance_uid=command.sop_instance_uid, **failure_fields(exc))
                _drop_file(message)
                status, comment = _HANDLER_FAILED, None
        self.served += 1
        dul._idle_timer.restart()
        if dul.assoc.is_established and not dul._kill_thread:
            _respond(dul, message, status, comment)


_storage_classes: dict[str, bool] = {}


def _is_storage(sop_class_uid: str) -> bool:
    """Whether pynetdicom serves *sop_class_uid* with its Storage service class (a
    C-STORE of, say, the Verification SOP Class is left to pynetdicom to refuse)."""
    known = _storage_classes.get(sop_class_uid)
    if known is None:
        known = uid_to_service_class(sop_class_uid) is StorageServiceClass
        if len(_storage_classes) < 4096:
            _storage_classes[sop_class_uid] = known
    return known


def _failed(message: _Message, exc: OSError) -> None:
    if message.error is None:
        log.error("spool_write_failed", error=str(exc))
        message.error = "spool write failed"
    _drop_file(message)


def _drop_file(message: _Message) -> None:
    message.content = None
    fd, message.fd = message.fd, None
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)
    if message.path is not None:
        message.path.unlink(missing_ok=True)


_serial = itertools.count()
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC


def _create(directory: Path) -> tuple[int, Path]:
    """A new file in *directory*, open for writing. Named after the process and a
    counter (``tempfile``'s random names cost more than the write of a small instance);
    a name already taken (a file left by an earlier process of the same ID: start-up
    clears them) is skipped."""
    for _ in range(100):
        path = directory / f"lane-{os.getpid()}-{next(_serial)}.dcm"
        try:
            return os.open(path, _CREATE_FLAGS, 0o600), path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free name for a received file", str(directory))


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _respond(dul: Any, message: _Message, status: int, comment: str | None) -> None:
    command = message.command
    encoded = c_store_rsp_command(
        message_id_being_responded_to=command.message_id, status=status,
        sop_class_uid=command.sop_class_uid, sop_instance_uid=command.sop_instance_uid,
        error_comment=comment,
    )
    dimse = dul.assoc.dimse
    if fits(dimse, encoded):
        if dul.to_provider_queue.empty():
            # Straight to the socket (the lane is used only while no handler watches
            # the data sent, which pynetdicom's send would report); a failure is
            # pynetdicom's: the connection closed (Evt17).
            try:
                dul.socket.socket.sendall(
                    p_data_tf(message.context_id, _COMMAND | _LAST, encoded))
            except OSError:
                dul.event_queue.put("Evt17")
            return
        # pynetdicom has something queued to send (the response to a message it served
        # just before): ours goes after it, as it would from its association thread.
        send_pdv(dimse, message.context_id, bytes([_COMMAND | _LAST]) + encoded)
        return
    # A peer accepting PDUs too small for a whole command set: pynetdicom fragments it.
    response = C_STORE()
    response.MessageIDBeingRespondedTo = command.message_id
    response.AffectedSOPClassUID = command.sop_class_uid
    response.AffectedSOPInstanceUID = command.sop_instance_uid
    response.Status = status
    if comment:
        response.ErrorComment = comment[:ERROR_COMMENT_MAX]
    dimse.send_msg(response, message.context_id)


# --- wiring ----------------------------------------------------------------------------

_install_lock = threading.Lock()
_installed = False


def attach(assoc: Any, lane: StoreLane) -> bool:
    """Give *assoc*'s P-DATA to *lane* from now on; False (nothing changed) when the
    lane is not installed or a handler is bound to an event the lane bypasses."""
    if not _installed or any(assoc.get_handlers(event) for event in BYPASSED_EVENTS):
        return False
    for settling in (evt.EVT_ESTABLISHED, evt.EVT_ABORTED, evt.EVT_RELEASED):
        assoc.bind(settling, lane._on_settled)
    attach_lane(assoc.dul, lane)
    return True


def lane_of(assoc: Any) -> StoreLane | None:
    """The lane attached to *assoc*, if any."""
    lane = dul_lane_of(getattr(assoc, "dul", None))
    return lane if isinstance(lane, StoreLane) else None


def install() -> bool:
    """Route attached associations' PDUs through their lane (idempotent). False when
    this pynetdicom version is not one the lane was tested with."""
    global _installed  # noqa: PLW0603 - pynetdicom's DUL class is process-wide
    with _install_lock:
        if _installed:
            return True
        if not install_lanes():
            return False
        original_serve = _association.Association._serve_request

        def serve_request(self: Any, msg: Any, context_id: int) -> None:
            try:
                original_serve(self, msg, context_id)
            finally:
                lane = lane_of(self)
                # Not an N-EVENT-REPORT, which pynetdicom serves on a thread of its own
                # without queueing it.
                if lane is not None and threading.current_thread() is self:
                    lane.pynetdicom_served()

        _association.Association._serve_request = serve_request
        _installed = True
        return True


def _read_pdu(dul: Any, lane: StoreLane) -> None:
    """pynetdicom's ``_read_pdu_data`` (same reads, same events on failure), with
    P-DATA-TF PDUs given to *lane* when it takes them.

    While the lane holds an unfinished message whose next PDU has already arrived, that
    PDU is read at once, without a turn of pynetdicom's reactor loop in between (a
    small instance comes as a command PDU and a data PDU), for a bounded number of PDUs
    and only while nothing else waits for the reactor."""
    lane.bind_log_context()
    for _ in range(_FOLLOWING_PDUS):
        received = receive_pdu(dul)
        if received is None:
            return
        pdu_type, header, body = received
        if not (pdu_type == _P_DATA_TF and lane.takes(dul)):
            break
        lane.receive(dul, body)
        if not (lane.holds_message() and _next_pdu_waiting(dul)):
            return
        dul._idle_timer.restart()  # as the reactor loop does after each PDU
    else:
        return
    try:
        pdu, event = dul._decode_pdu(bytearray(header) + body)
    except Exception:  # noqa: BLE001 - as pynetdicom: an undecodable PDU aborts
        log.warning("dimse_undecodable_pdu", pdu_type=f"0x{pdu_type:02X}")
        dul.event_queue.put("Evt19")
        return
    dul.event_queue.put(event)
    dul._recv_pdu.put(pdu)


def _next_pdu_waiting(dul: Any) -> bool:
    """Whether the association's next PDU can be read now and the reactor has nothing
    else to do (no kill request, nothing queued to send, no event to process)."""
    if dul._kill_thread or not dul.to_provider_queue.empty() or not dul.event_queue.empty():
        return False
    raw = getattr(dul.socket, "socket", None)
    if raw is None:
        return False
    if isinstance(raw, ssl.SSLSocket) and raw.pending():
        return True
    try:
        readable, _, _ = select.select([raw], [], [], 0)
    except (OSError, ValueError):
        return False
    return bool(readable)


def receive_pdu(dul: Any) -> tuple[int, bytes, bytearray] | None:
    """One whole PDU from the socket (type, header, body); None after queueing the
    state machine event for a connection that closed (Evt17) or an unknown PDU type
    (Evt19), as pynetdicom does."""
    try:
        header = bytes(dul.socket.recv(6))
        pdu_type, _, length = struct.unpack(">BBL", header)
        if pdu_type not in _PDU_TYPES:
            log.warning("dimse_unknown_pdu_type", pdu_type=f"0x{pdu_type:02X}")
            dul.event_queue.put("Evt19")
            return None
        body: bytearray = dul.socket.recv(length)
    except (OSError, TimeoutError, struct.error):
        dul.event_queue.put("Evt17")  # closed (or cut short) before a whole PDU arrived
        return None
    if len(body) != length:
        dul.event_queue.put("Evt17")
        return None
    return pdu_type, header, body
