"""The event-driven waits that replace pynetdicom's fixed 1 ms polling sleeps."""

from __future__ import annotations

import queue
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynetdicom
import pytest
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification

from gateway import dimse_reactor
from gateway.dimse_reactor import (
    _association_idle_wait,
    _Checkpoint,
    _dul_idle_wait,
    _ToUser,
    _Waker,
)
from tests.helpers.net import LOOPBACK, wait_until


@dataclass
class _Transport:
    socket: socket.socket | None
    _is_connected: bool = True


@dataclass
class _Dul:
    socket: _Transport
    _gateway_waker: _Waker | None
    to_provider_queue: queue.Queue[Any] = field(default_factory=queue.Queue)


@pytest.fixture
def connection() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, peer = socket.socketpair()
    yield ours, peer
    ours.close()
    peer.close()


@pytest.fixture
def waker() -> Iterator[_Waker]:
    waker = _Waker()
    yield waker
    waker.close()


def _timed(call: Any) -> float:
    started = time.monotonic()
    call()
    return time.monotonic() - started


def _later(seconds: float, action: Any) -> threading.Timer:
    timer = threading.Timer(seconds, action)
    timer.start()
    return timer


def test_the_installed_pynetdicom_is_the_tested_version() -> None:
    # The patch is version-guarded; upgrading pynetdicom must come with a re-test.
    assert pynetdicom.__version__ in dimse_reactor.SUPPORTED_VERSIONS
    assert dimse_reactor.install() is True
    assert dimse_reactor.install() is True  # idempotent


def test_dul_wait_ends_when_the_peer_sends(
    connection: tuple[socket.socket, socket.socket], waker: _Waker
) -> None:
    ours, peer = connection
    dul = _Dul(_Transport(ours), waker)
    timer = _later(0.05, lambda: peer.send(b"\x04"))
    assert _timed(lambda: _dul_idle_wait(dul, 2.0)) < 1.0
    timer.join()


def test_dul_wait_ends_when_a_primitive_is_queued_for_sending(
    connection: tuple[socket.socket, socket.socket], waker: _Waker
) -> None:
    ours, _ = connection
    dul = _Dul(_Transport(ours), waker)
    timer = _later(0.05, waker.wake)
    assert _timed(lambda: _dul_idle_wait(dul, 2.0)) < 1.0
    timer.join()
    # The wake-up was consumed: the next wait lasts its full delay again.
    assert _timed(lambda: _dul_idle_wait(dul, 0.1)) >= 0.09


def test_dul_wait_does_not_wait_with_work_queued(
    connection: tuple[socket.socket, socket.socket], waker: _Waker
) -> None:
    ours, _ = connection
    dul = _Dul(_Transport(ours), waker)
    dul.to_provider_queue.put("P-DATA")
    assert _timed(lambda: _dul_idle_wait(dul, 2.0)) < 0.5


@pytest.mark.parametrize("state", ["not connected", "no socket", "closed socket"])
def test_dul_wait_sleeps_its_full_delay_when_it_cannot_select(
    connection: tuple[socket.socket, socket.socket], waker: _Waker, state: str
) -> None:
    # A socket at EOF is always readable; pynetdicom does not read it once it is no
    # longer connected, so selecting on it would turn the loop into a busy spin.
    ours, peer = connection
    peer.close()
    transport = _Transport(ours)
    if state == "not connected":
        transport._is_connected = False
    elif state == "no socket":
        transport.socket = None
    else:
        ours.close()
    dul = _Dul(transport, waker)
    assert _timed(lambda: _dul_idle_wait(dul, 0.1)) >= 0.09


@dataclass
class _Dimse:
    msg_queue: queue.Queue[Any] = field(default_factory=queue.Queue)


@dataclass
class _Assoc:
    dimse: _Dimse = field(default_factory=_Dimse)
    _reactor_checkpoint: threading.Event | None = None
    dul: Any = None


def test_association_wait_ends_when_a_message_arrives() -> None:
    assoc = _Assoc()
    timer = _later(0.05, lambda: assoc.dimse.msg_queue.put((1, "C-STORE-RQ")))
    assert _timed(lambda: _association_idle_wait(assoc, 2.0)) < 1.0
    timer.join()
    # The message is left for pynetdicom's own get().
    assert assoc.dimse.msg_queue.get_nowait() == (1, "C-STORE-RQ")


def test_association_wait_lasts_its_delay_when_nothing_arrives() -> None:
    assoc = _Assoc()
    assoc._reactor_checkpoint = _Checkpoint(assoc)
    assert _timed(lambda: _association_idle_wait(assoc, 0.1)) >= 0.09


def test_association_wait_ends_when_a_pause_is_requested() -> None:
    # pynetdicom pauses the association thread around each message it sends, spinning
    # until the thread reaches its checkpoint: the request must end the idle wait.
    assoc = _Assoc()
    assoc._reactor_checkpoint = _Checkpoint(assoc)
    timer = _later(0.05, assoc._reactor_checkpoint.clear)
    assert _timed(lambda: _association_idle_wait(assoc, 2.0)) < 1.0
    timer.join()
    # Already paused: no wait at all.
    assert _timed(lambda: _association_idle_wait(assoc, 2.0)) < 0.5


def test_association_wait_ends_when_the_dul_hands_over_a_primitive() -> None:
    # A release or abort indication from the DUL thread: the association thread acts on
    # it at once, not when its wait runs out.
    assoc = _Assoc()
    assoc._reactor_checkpoint = _Checkpoint(assoc)
    assoc.dul = SimpleNamespace(to_user_queue=_ToUser(assoc))
    timer = _later(0.05, lambda: assoc.dul.to_user_queue.put("A-RELEASE indication"))
    assert _timed(lambda: _association_idle_wait(assoc, 2.0)) < 1.0
    timer.join()
    # Not taken yet (pynetdicom's own check takes it): no wait at all meanwhile.
    assert _timed(lambda: _association_idle_wait(assoc, 2.0)) < 0.5


def test_association_wait_ends_when_the_association_is_killed(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    dimse_reactor.install()
    monkeypatch.setattr(dimse_reactor, "IDLE_WAIT", 3.0)  # what a kill must not wait out
    ae = AE(ae_title="KILLED")
    ae.add_supported_context(Verification)
    ae.add_requested_context(Verification)
    server = ae.start_server((LOOPBACK, 0), block=False)
    try:
        assoc = ae.associate(LOOPBACK, server.server_address[1], ae_title="KILLED")
        assert assoc.is_established
        wait_until(lambda: len(server.active_associations) == 1, 5)
        acceptor = server.active_associations[0]
        threading.Event().wait(0.2)  # both threads of each side now in their idle waits
        assert _timed(acceptor.kill) < 1.5
        assert _timed(assoc.kill) < 1.5
    finally:
        server.shutdown()


def test_association_sockets_have_nagle_turned_off_both_ways() -> None:
    # With Nagle on, the last PDU of a C-STORE waits for the peer's delayed ACK.
    dimse_reactor.install()
    ae = AE(ae_title="NODELAY")
    ae.add_supported_context(Verification)
    ae.add_requested_context(Verification)
    server = ae.start_server((LOOPBACK, 0), block=False)
    try:
        port = server.server_address[1]
        assoc = ae.associate(LOOPBACK, port, ae_title="NODELAY")
        assert assoc.is_established
        try:
            wait_until(lambda: len(server.active_associations) == 1, 5)
            ours = assoc.dul.socket.socket
            theirs = server.active_associations[0].dul.socket.socket
            for sock in (ours, theirs):
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            assert assoc.send_c_echo().Status == 0
        finally:
            assoc.release()
    finally:
        server.shutdown()


@dataclass
class _Primitive:
    is_valid_request: bool
    is_valid_response: bool
    msg_type: str = "C-STORE"


def test_a_response_taken_by_the_requestor_loop_goes_back_to_the_sender() -> None:
    # pynetdicom's requestor loop can take the C-STORE-RSP the sending thread waits for.
    dimse_reactor.install()
    assoc = Association.__new__(Association)
    assoc.mode = "requestor"
    assoc._sent_release = False
    dimse = _Dimse()
    assoc.dimse = dimse
    response = _Primitive(is_valid_request=False, is_valid_response=True)
    assoc._serve_request(response, 3)
    assert dimse.msg_queue.get_nowait() == (3, response)
