"""Event-driven waits for pynetdicom's reactor loops.

pynetdicom runs two polling loops per association. The DUL thread checks the socket
and, when there is nothing to do, sleeps a fixed 1 ms; the association thread sleeps
1 ms before every look at its DIMSE message queue. A C-STORE therefore
waits up to a millisecond for the request to be noticed, another for the decoded
message to be picked up and another for the response to be sent: more than the
instance takes to store on a fast disk.

This module keeps pynetdicom's loops and their timing as they are, and only lets the
idle waits end early when there is work:

- the DUL thread waits in ``select()`` on its socket and on a wake-up socket that is
  written whenever a primitive is queued for sending (a C-STORE response), instead of
  sleeping;
- the association thread waits on its DIMSE queue's condition instead of sleeping,
  and a request to pause it (pynetdicom pauses it around every message it sends and
  spins until it is paused) wakes it too, so the pause takes effect at once instead
  of after the thread's next 1 ms sleep.

It also turns off Nagle's algorithm (``TCP_NODELAY``) on association sockets, inbound
and outbound, as DCMTK and Orthanc do: pynetdicom sends a C-STORE as a command PDU
followed by data PDUs, and with Nagle on, the last small segment waits for the peer's
delayed ACK, 40 ms per instance on Linux.

Faster replies expose a race in pynetdicom's requestor: the association thread's loop
can pass its pause checkpoint just before a sending thread pauses it, and then take the
C-STORE response that the sender is waiting for (logging "Received unexpected C-STORE
service message"); the sender then waits out the DIMSE timeout. A response taken that
way is put back on the queue for the sender.

Whatever either loop has to act on ends its wait: data on the socket, a primitive
queued for sending and a request to stop end the DUL thread's; a decoded message, a
pause request, a primitive from the DUL (a release or abort indication) and a request
to stop end the association thread's. Only timers (ARTIM, the idle timeout) are left
to be noticed when a wait runs out, so a wait lasts up to 100 ms instead of 1 ms: many
open associations no longer wake the interpreter a thousand times a second each. The
patch
is applied only to the pynetdicom version it was written and tested against
(``SUPPORTED_VERSIONS``); with any other version the stock loops run unchanged.
"""

from __future__ import annotations

import contextlib
import queue
import select
import socket
import ssl
import threading
import time
from typing import Any, Protocol

import pynetdicom
from pynetdicom import association as _association
from pynetdicom import dul as _dul
from pynetdicom import transport as _transport

from gateway.logs import get_logger

log = get_logger(__name__)

SUPPORTED_VERSIONS = frozenset({"3.0.4"})
_REACTOR_LOOP_DELAY = 0.001  # the fixed sleep in Association._run_reactor
IDLE_WAIT = 0.1  # the longest an idle reactor loop waits before looking around

_installed = False
_install_lock = threading.Lock()


class _Waker:
    """A socket pair: the DUL thread selects on ``reader``; senders write to ``writer``."""

    __slots__ = ("reader", "writer")

    def __init__(self) -> None:
        self.reader, self.writer = socket.socketpair()
        self.reader.setblocking(False)
        self.writer.setblocking(False)

    def wake(self) -> None:
        # A full buffer means a wake-up is already pending: nothing to add.
        with contextlib.suppress(BlockingIOError, OSError):
            self.writer.send(b"\0")

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while self.reader.recv(256):
                pass

    def close(self) -> None:
        self.reader.close()
        self.writer.close()


def _dul_idle_wait(dul: Any, delay: float) -> None:
    """Wait up to *delay* for data on the association's socket or a queued primitive."""
    if not dul.to_provider_queue.empty():
        return
    waker: _Waker | None = getattr(dul, "_gateway_waker", None)
    transport = getattr(dul, "socket", None)
    raw = getattr(transport, "socket", None) if transport is not None else None
    if waker is None or raw is None or not getattr(transport, "_is_connected", False):
        # Not connected (yet, or any more): pynetdicom does not read the socket then, so
        # a readable one (at EOF) would end every wait at once. Sleep as it does.
        time.sleep(delay)
        return
    if isinstance(raw, ssl.SSLSocket) and raw.pending():
        return  # decrypted bytes already buffered: select() would not see them
    try:
        readable, _, _ = select.select([raw, waker.reader], [], [], delay)
    except (OSError, ValueError):
        time.sleep(delay)  # closed under us: the reactor's own check reports it
        return
    if waker.reader in readable:
        waker.drain()


def _no_delay(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _association_idle_wait(assoc: Any, delay: float) -> None:
    """Wait up to *delay* for a decoded DIMSE message to be queued for *assoc*, or for
    a request to pause its reactor."""
    messages = getattr(getattr(assoc, "dimse", None), "msg_queue", None)
    not_empty = getattr(messages, "not_empty", None)
    checkpoint = getattr(assoc, "_reactor_checkpoint", None)
    if messages is None or not_empty is None:
        time.sleep(delay)
        return
    # The condition shares the queue's (non-reentrant) mutex: look at the deque itself.
    with not_empty:
        if (not messages.queue and (checkpoint is None or checkpoint.is_set())
                and not getattr(assoc, "_kill", False) and not _primitive_waiting(assoc)):
            not_empty.wait(delay)


def _primitive_waiting(assoc: Any) -> bool:
    to_user = getattr(getattr(assoc, "dul", None), "to_user_queue", None)
    return bool(to_user is not None and to_user.qsize())


def _wake_association(assoc: Any) -> None:
    """End the association thread's idle wait."""
    not_empty = getattr(getattr(getattr(assoc, "dimse", None), "msg_queue", None),
                        "not_empty", None)
    if not_empty is not None:
        with not_empty:
            not_empty.notify_all()


class _ToUser(queue.Queue[Any]):
    """The DUL's queue of primitives for the association thread (release and abort
    indications): putting one wakes that thread."""

    def __init__(self, assoc: Any) -> None:
        super().__init__()
        self._assoc = assoc

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        _wake_association(self._assoc)


class _Checkpoint(threading.Event):
    """An association's reactor checkpoint whose clearing (a pause request) wakes the
    association thread from its idle wait."""

    def __init__(self, assoc: Any) -> None:
        super().__init__()
        self._assoc = assoc
        self.set()

    def clear(self) -> None:
        super().clear()
        _wake_association(self._assoc)


class _TimeForDul:
    """Stands in for the ``time`` module inside ``pynetdicom.dul``."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(delay: float) -> None:
        current = threading.current_thread()
        if isinstance(current, _dul.DULServiceProvider):
            _dul_idle_wait(current, max(delay, IDLE_WAIT))
        else:
            time.sleep(delay)


class _TimeForAssociation:
    """Stands in for the ``time`` module inside ``pynetdicom.association``."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(delay: float) -> None:
        current = threading.current_thread()
        if delay == _REACTOR_LOOP_DELAY and isinstance(current, _association.Association):
            _association_idle_wait(current, IDLE_WAIT)
        else:
            time.sleep(delay)


def install() -> bool:
    """Install the event-driven waits (idempotent). False when this pynetdicom version
    is not one they were tested with; the stock loops are then left in place."""
    global _installed  # noqa: PLW0603 - pynetdicom's loops are process-wide
    with _install_lock:
        if _installed:
            return True
        version = getattr(pynetdicom, "__version__", "")
        if version not in SUPPORTED_VERSIONS:
            log.warning("dimse_reactor_stock", pynetdicom_version=version,
                        reason="event-driven waits not tested with this version")
            return False
        _patch_dul()
        _patch_association()
        _patch_sockets()
        _dul.time = _TimeForDul()
        _association.time = _TimeForAssociation()
        _installed = True
        return True


class Lane(Protocol):
    """A lane attached to an association's DUL provider (:mod:`gateway.store_lane`,
    :mod:`gateway.send_lane`): it reads the PDUs it wants itself."""

    def reads_next_pdu(self) -> bool:
        """Whether the DUL thread's next PDU read is the lane's."""

    def read_pdu(self, dul: Any) -> None:
        """Read one PDU (or more) from *dul*'s socket, as pynetdicom's read would."""

    def close(self) -> None:
        """The DUL thread has ended."""


_lanes_installed = False


def attach_lane(dul: Any, lane: Lane) -> None:
    """Give *dul*'s PDU reads to *lane* from now on (:func:`install_lanes` first)."""
    dul._gateway_lane = lane


def lane_of(dul: Any) -> Lane | None:
    lane: Lane | None = getattr(dul, "_gateway_lane", None)
    return lane


def install_lanes() -> bool:
    """Route the PDU reads of DUL providers with a lane attached through that lane while
    it wants them, and close the lane when the provider's thread ends (idempotent).
    False when this pynetdicom version is not one the lanes were tested with."""
    global _lanes_installed  # noqa: PLW0603 - pynetdicom's DUL class is process-wide
    with _install_lock:
        if _lanes_installed:
            return True
        if getattr(pynetdicom, "__version__", "") not in SUPPORTED_VERSIONS:
            return False
        provider = _dul.DULServiceProvider
        original_read = provider._read_pdu_data
        original_run = provider.run_reactor

        def read_pdu_data(self: Any) -> None:
            lane = lane_of(self)
            if lane is None or not lane.reads_next_pdu():
                original_read(self)
                return
            lane.read_pdu(self)

        def run_reactor(self: Any) -> None:
            try:
                original_run(self)
            finally:
                lane = lane_of(self)
                if lane is not None:
                    lane.close()

        provider._read_pdu_data = read_pdu_data
        provider.run_reactor = run_reactor
        _lanes_installed = True
        return True


def _patch_dul() -> None:
    """A waker per DUL thread, woken by a primitive to send and by a request to stop."""
    provider = _dul.DULServiceProvider
    original_run = provider.run_reactor
    original_send = provider.send_pdu
    original_kill_dul = provider.kill_dul

    def run_reactor(self: Any) -> None:
        self._gateway_waker = _Waker()
        try:
            original_run(self)
        finally:
            waker, self._gateway_waker = self._gateway_waker, None
            waker.close()

    def wake(self: Any) -> None:
        waker = getattr(self, "_gateway_waker", None)
        if waker is not None:
            waker.wake()

    def send_pdu(self: Any, primitive: Any) -> None:
        original_send(self, primitive)
        wake(self)

    def kill_dul(self: Any) -> None:
        original_kill_dul(self)
        wake(self)

    provider.run_reactor = run_reactor
    provider.send_pdu = send_pdu
    provider.kill_dul = kill_dul


def _patch_association() -> None:
    """The association thread woken by a pause request, a primitive from the DUL and a
    request to stop; a requestor's stolen response put back (see the module's doc)."""
    association = _association.Association
    original_init = association.__init__
    original_kill = association.kill
    original_serve = association._serve_request

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self._reactor_checkpoint = _Checkpoint(self)
        self.dul.to_user_queue = _ToUser(self)

    def kill(self: Any) -> None:
        self._kill = True  # pynetdicom sets it too, then waits for the DUL to stop
        _wake_association(self)
        original_kill(self)

    def serve_request(self: Any, msg: Any, context_id: int) -> None:
        if (self.is_requestor and msg is not None and not msg.is_valid_request
                and msg.is_valid_response):
            self.dimse.msg_queue.put((context_id, msg))
            return
        original_serve(self, msg, context_id)

    association.__init__ = init
    association.kill = kill
    association._serve_request = serve_request


def _patch_sockets() -> None:
    """Nagle off on association sockets, inbound and outbound."""
    original_create_socket = _transport.AssociationSocket._create_socket
    original_get_request = _transport.AssociationServer.get_request

    def create_socket(self: Any, address: Any) -> socket.socket:
        sock: socket.socket = original_create_socket(self, address)
        _no_delay(sock)
        return sock

    def get_request(self: Any) -> tuple[socket.socket, tuple[str, int]]:
        sock, address = original_get_request(self)
        _no_delay(sock)
        return sock, address

    _transport.AssociationSocket._create_socket = create_socket
    _transport.AssociationServer.get_request = get_request
