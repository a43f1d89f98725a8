"""The C-STORE send lane: a forwarder's C-STOREs of stored bytes sent and answered
without pynetdicom's per-message machinery.

For every C-STORE it sends, pynetdicom pauses the association's thread, builds a
primitive, queues each P-DATA PDU for the DUL thread to encode and send through its
state machine, and on the way back decodes the response PDU into objects, runs it
through the state machine and the DIMSE provider, decodes the command set into a pydicom
dataset and hands it over through a queue. For a small instance that was most of the
forwarder's interpreter time, and a large one went out as hundreds of queued primitives.

Once a forwarding association is established, :func:`attach` gives it a
:class:`SendLane`:

- :meth:`SendLane.send` runs on the forwarder's thread: it encodes the C-STORE-RQ
  command set and the data set's P-DATA-TF PDUs (the data set read from the stored
  object in the fragments pynetdicom would cut) and writes them to the socket itself;
- the association's DUL thread reads PDUs as pynetdicom does; while the lane waits for
  a response, a P-DATA-TF holding command fragments is read here, the C-STORE-RSP
  parsed (:func:`parse_c_store_rsp`) and handed to the waiting thread. Every other PDU,
  and every PDU while the lane waits for nothing, takes pynetdicom's path.

A response that is not the awaited C-STORE-RSP (another message ID or SOP instance, a
data set, a malformed command set), no response within the DIMSE timeout, a destination
that stops taking data for that long in the middle of a message, or the association
ending meanwhile fail the send with :class:`SendLaneError`: the forwarder aborts the
association (once its own write has ended), records a transient failure and starts a
new association. Anything the lane does not take (an instance converted or morphed, a
command set larger than the peer's maximum PDU, an observer bound to the events the
lane bypasses, PDUs pynetdicom still has queued, a TLS connection) is sent by pynetdicom
as before.

pynetdicom's DUL thread writes to the socket only what is queued for it: while the lane
sends, that is at most an abort (after which the association is finished anyway) or the
answer to a peer's A-RELEASE-RQ, which a peer may not send in the middle of a message.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from gateway.dimse_codec import c_store_rq_command, fits, p_data_tf, plain_uids
from gateway.dimse_reactor import attach_lane, install_lanes
from gateway.store_lane import BYPASSED_EVENTS, ProtocolError, pdv_items, receive_pdu

_P_DATA_TF = 0x04
_COMMAND = 0x01
_LAST = 0x02
_C_STORE_RSP = 0x8001
_NO_DATA_SET = 0x0101
_PRIORITY_LOW = 0x0002  # what pynetdicom's send_c_store sends by default
_ALIVE_CHECK = 0.1  # seconds between looks at the association while waiting
_BATCHED_WRITE = 256 * 1024  # PDUs of a message up to this size go out in one write
_READ_SIZE = 256 * 1024  # bytes of the data set read at a time
_GATHER_PARTS = 64  # buffers given to one sendmsg (well under the system's IOV_MAX)
MAX_FRAGMENT = 1024 * 1024
"""The largest data fragment sent when the peer's maximum PDU length allows more."""


class SendLaneError(Exception):
    """The C-STORE got no usable answer (no response, the association ended, a protocol
    error); the association is not to be used any more."""


class SendStalledError(SendLaneError):
    """The destination stopped taking data in the middle of a message."""


@dataclass(frozen=True, slots=True)
class StoreResponse:
    """The parts of a C-STORE-RSP command set the forwarder needs."""

    message_id_being_responded_to: int
    status: int
    error_comment: str | None = None
    sop_instance_uid: str | None = None


_US = struct.Struct("<H")


def parse_c_store_rsp(encoded: bytes | bytearray | memoryview) -> StoreResponse | None:
    """A C-STORE-RSP read from its command set (implicit VR little endian, PS3.7 E.1);
    None for anything else: another command, a data set announced, a missing status
    or message ID, an element outside group 0000, an encoding that runs past its end.
    Elements a response may carry besides (offending element, error ID, ...) are read
    past."""
    view = memoryview(encoded)
    values: dict[int, bytes] = {}
    position, end = 0, len(view)
    while position < end:
        if end - position < 8:
            return None
        group, element, length = struct.unpack_from("<HHI", view, position)
        position += 8
        if group != 0x0000 or length > end - position or element in values:
            return None
        values[element] = bytes(view[position:position + length])
        position += length
    numbers = {}
    for element in (0x0100, 0x0120, 0x0800, 0x0900):
        value = values.get(element)
        if value is None or len(value) != 2:
            return None
        numbers[element] = _US.unpack(value)[0]
    if numbers[0x0100] != _C_STORE_RSP or numbers[0x0800] != _NO_DATA_SET:
        return None
    comment = values.get(0x0902)
    instance = values.get(0x1000)
    return StoreResponse(
        message_id_being_responded_to=numbers[0x0120],
        status=numbers[0x0900],
        error_comment=_text(comment),
        sop_instance_uid=_text(instance, "\x00 "),
    )


def _text(value: bytes | None, strip: str = " ") -> str | None:
    if value is None:
        return None
    return value.decode("ascii", "replace").rstrip(strip) or None


def request_pdus(context_id: int, command: bytes, stream: BinaryIO, length: int,
                 max_pdu_length: int) -> Iterator[bytes | memoryview]:
    """The bytes of the P-DATA-TF PDUs of a C-STORE-RQ, in parts to be written one after
    the other: the command set in one PDU, then the data set (the next *length* bytes of
    *stream*) in fragments of at most ``max_pdu_length - 6`` bytes as pynetdicom cuts
    them, each PDU's header and its fragment as two parts; the last fragment flagged.
    The stream is read :data:`_READ_SIZE` bytes at a time and the fragments are views of
    what was read (no copy). Fragments are at most :data:`MAX_FRAGMENT` bytes when the
    peer sets no smaller limit (0: none), so that a large data set is never read into
    memory whole. A stream that ends early raises ``OSError``."""
    yield p_data_tf(context_id, _COMMAND | _LAST, command)
    if max_pdu_length == 0 or max_pdu_length - 6 > MAX_FRAGMENT:
        size = min(length, MAX_FRAGMENT) or 1
    else:
        size = max_pdu_length - 6
    count = max(1, -(-length // size))
    per_read = max(1, _READ_SIZE // size)
    for first in range(0, count, per_read):
        fragments = range(first, min(count, first + per_read))
        start, end = first * size, min(length, (fragments[-1] + 1) * size)
        chunk = stream.read(end - start)
        if len(chunk) != end - start:
            raise OSError(f"the stored data set ends before its {length} bytes")
        view = memoryview(chunk)
        for index in fragments:
            fragment = view[index * size - start:min(length, (index + 1) * size) - start]
            last = index == count - 1
            yield _pdv_header(context_id, _LAST if last else 0x00, len(fragment))
            yield fragment


def _pdv_header(context_id: int, control: int, length: int) -> bytes:
    """The header of a P-DATA-TF PDU holding one PDV of *length* bytes of fragment."""
    return struct.pack(">BBLLBB", 0x04, 0, length + 6, length + 2, context_id, control)


def send_all(sock: socket.socket, parts: list[bytes | memoryview], stall_seconds: float) -> None:
    """Write *parts* one after the other (gathered into one system call where they fit),
    waiting at most *stall_seconds* at a time for the peer to take more: a destination
    that stops reading fails the send instead of holding the thread."""
    views = [memoryview(part) for part in parts if len(part)]
    while views:
        try:
            sent = sock.sendmsg(views[:_GATHER_PARTS], [], socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            _, writable, _ = select.select([], [sock], [], stall_seconds)
            if not writable:
                raise SendStalledError(
                    f"the destination took no data for {stall_seconds:g} s") from None
            continue
        done = 0
        while done < len(views) and sent >= len(views[done]):
            sent -= len(views[done])
            done += 1
        del views[:done]
        if sent:
            views[0] = views[0][sent:]


class _Waiter:
    __slots__ = ("command", "done", "error", "message_id", "response", "sop_instance_uid")

    def __init__(self, message_id: int, sop_instance_uid: str) -> None:
        self.message_id = message_id
        self.sop_instance_uid = sop_instance_uid
        self.command = bytearray()
        self.done = threading.Event()
        self.response: StoreResponse | None = None
        self.error: str | None = None


class SendLane:
    """One requestor association's lane."""

    def __init__(self, assoc: Any) -> None:
        self._assoc = assoc
        self._dul = assoc.dul
        self._lock = threading.Lock()
        self._waiter: _Waiter | None = None
        self._message_id = 0
        self.sent = 0
        """C-STOREs answered through the lane (for tests and diagnostics)."""

    # --- the forwarder's thread ----------------------------------------------------------

    def takes(self, command: bytes) -> bool:
        """Whether a C-STORE-RQ with this command set can go through the lane: it fits
        in one PDU, and nothing pynetdicom queued earlier is still waiting to be sent
        (the lane's PDUs would overtake it)."""
        return fits(self._assoc.dimse, command) and self._dul.to_provider_queue.empty()

    def command(self, sop_class_uid: str, sop_instance_uid: str) -> bytes | None:
        """The next C-STORE-RQ command set; None when the lane cannot send it."""
        if not plain_uids(sop_class_uid, sop_instance_uid):
            return None
        self._message_id = self._message_id % 0xFFFF + 1
        command = c_store_rq_command(
            message_id=self._message_id, priority=_PRIORITY_LOW,
            sop_class_uid=sop_class_uid, sop_instance_uid=sop_instance_uid,
        )
        return command if self.takes(command) else None

    def send(self, context_id: int, command: bytes, sop_instance_uid: str, source: Path, *,
             offset: int, length: int, timeout: float) -> StoreResponse:
        """Send the C-STORE-RQ *command* with the data set of *length* bytes at *offset*
        of *source*; return the response. Raises :class:`SendLaneError` when there is
        none (the association must then be dropped) and ``OSError`` when the source
        cannot be read before anything was sent."""
        waiter = _Waiter(self._message_id, sop_instance_uid)
        limit = int(self._assoc.acceptor.maximum_length or 0)
        # Opened before anything is sent: a missing file fails before half a message.
        with source.open("rb") as stream:
            stream.seek(offset)
            with self._lock:
                self._waiter = waiter
            try:
                self._write(request_pdus(context_id, command, stream, length, limit),
                            timeout)
                return self._wait(waiter, timeout)
            finally:
                with self._lock:
                    self._waiter = None

    def _write(self, parts: Iterator[bytes | memoryview], stall_seconds: float) -> None:
        """Write the PDUs' parts, gathered up to :data:`_BATCHED_WRITE` bytes (one system
        call for a small instance). A source that cannot be read is an ``OSError``
        before the first write; after it, the association is unusable, like after any
        other failure. A destination that stops reading is shut out, so that the abort
        that follows cannot wait on it too."""
        sock = self._dul.socket.socket
        if sock is None:
            raise SendLaneError("the association's connection is closed")
        pending: list[bytes | memoryview] = []
        size = 0
        written = False
        try:
            for part in parts:
                pending.append(part)
                size += len(part)
                if size >= _BATCHED_WRITE or len(pending) >= _GATHER_PARTS:
                    written = True
                    send_all(sock, pending, stall_seconds)
                    pending, size = [], 0
            written = True
            send_all(sock, pending, stall_seconds)
        except SendStalledError:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            raise
        except OSError as exc:
            if not written:
                raise  # the source could not be read: nothing went out
            raise SendLaneError(f"sending failed: {exc}") from exc

    def _wait(self, waiter: _Waiter, timeout: float) -> StoreResponse:
        deadline = time.monotonic() + timeout
        while not waiter.done.wait(_ALIVE_CHECK):
            if not self._dul.is_alive() or self._dul.state_machine.current_state != "Sta6":
                raise SendLaneError("the association ended while waiting for the response")
            if time.monotonic() >= deadline:
                raise SendLaneError(f"no response within {timeout:g} s")
        if waiter.error is not None:
            raise SendLaneError(waiter.error)
        assert waiter.response is not None
        self.sent += 1
        return waiter.response

    # --- the DUL thread ----------------------------------------------------------------

    def waiting(self) -> bool:
        with self._lock:
            return self._waiter is not None

    def reads_next_pdu(self) -> bool:
        return self.waiting()

    def read_pdu(self, dul: Any) -> None:
        _read_pdu(dul, self)

    def receive(self, body: bytearray) -> None:
        """The PDV items of a P-DATA-TF PDU that arrived while a response is awaited."""
        with self._lock:
            waiter = self._waiter
        if waiter is None:
            return
        try:
            for _context_id, control, pdv in pdv_items(body):
                self._fragment(waiter, control, pdv[1:])
        except ProtocolError as exc:
            # Not aborted here: the sender may be writing to the socket still. It gets the
            # error and aborts the association once its write has ended.
            waiter.error = f"protocol error in the response: {exc}"
            waiter.done.set()

    def _fragment(self, waiter: _Waiter, control: int, fragment: memoryview) -> None:
        if not control & _COMMAND:
            raise ProtocolError("a data set in a C-STORE response")
        waiter.command += fragment
        if control & _LAST:
            self._answer(waiter)

    def _answer(self, waiter: _Waiter) -> None:
        response = parse_c_store_rsp(waiter.command)
        if response is None:
            raise ProtocolError("not a C-STORE response")
        if response.message_id_being_responded_to != waiter.message_id:
            raise ProtocolError("a response to another message")
        if response.sop_instance_uid not in (None, waiter.sop_instance_uid):
            raise ProtocolError("a response about another SOP instance")
        waiter.response = response
        waiter.done.set()

    def close(self) -> None:
        """The association's DUL thread has ended: a waiting send gets no response."""
        with self._lock:
            waiter = self._waiter
        if waiter is not None and not waiter.done.is_set():
            waiter.error = "the association ended while waiting for the response"
            waiter.done.set()


# --- wiring ----------------------------------------------------------------------------

_install_lock = threading.Lock()
_installed = False


def attach(assoc: Any) -> SendLane | None:
    """A lane for the established requestor association *assoc*; None when the lane is
    not installed or a handler is bound to an event the lane bypasses."""
    if not _installed or any(assoc.get_handlers(event) for event in BYPASSED_EVENTS):
        return None
    if isinstance(getattr(assoc.dul.socket, "socket", None), ssl.SSLSocket):
        return None  # two threads must not read and write one TLS connection at once
    lane = SendLane(assoc)
    attach_lane(assoc.dul, lane)
    return lane


def install() -> bool:
    """Read attached associations' responses through their lane (idempotent). False when
    this pynetdicom version is not one the lane was tested with."""
    global _installed  # noqa: PLW0603 - pynetdicom's DUL class is process-wide
    with _install_lock:
        _installed = _installed or install_lanes()
        return _installed


def _read_pdu(dul: Any, lane: SendLane) -> None:
    """pynetdicom's ``_read_pdu_data`` (same reads, same events on failure), with the
    P-DATA-TF PDUs of an awaited response given to *lane*."""
    received = receive_pdu(dul)
    if received is None:
        return
    pdu_type, header, body = received
    if pdu_type == _P_DATA_TF:
        lane.receive(body)
        return
    try:
        pdu, event = dul._decode_pdu(bytearray(header) + body)
    except Exception:  # noqa: BLE001 - as pynetdicom: an undecodable PDU aborts
        dul.event_queue.put("Evt19")
        return
    dul.event_queue.put(event)
    dul._recv_pdu.put(pdu)

