"""The C-STORE send lane: requests encoded as pynetdicom encodes them, responses read as
pynetdicom reads them, and every way a response can go wrong ending the send."""

from __future__ import annotations

import io
import queue
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pynetdicom.dimse_messages import C_ECHO_RSP, C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import P_DATA_TF

from gateway.dimse_codec import c_store_rq_command, c_store_rsp_command, p_data_tf
from gateway.send_lane import (
    MAX_FRAGMENT,
    SendLane,
    SendLaneError,
    SendStalledError,
    StoreResponse,
    parse_c_store_rsp,
    request_pdus,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
UID = "1.2.3.4.5"


def _pynetdicom_rsp(**fields: Any) -> bytes:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = 9
    primitive.AffectedSOPClassUID = CT
    primitive.AffectedSOPInstanceUID = UID
    primitive.Status = 0
    for name, value in fields.items():
        setattr(primitive, name, value)
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    return bytes(encode(message.command_set, True, True))


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _echo_rsp() -> bytes:
    primitive = C_ECHO()
    primitive.MessageIDBeingRespondedTo = 9
    primitive.Status = 0
    message = C_ECHO_RSP()
    message.primitive_to_message(primitive)
    return bytes(encode(message.command_set, True, True))


@pytest.mark.parametrize(("encoded", "expected"), [
    (_pynetdicom_rsp(), StoreResponse(9, 0x0000, None, UID)),
    (_pynetdicom_rsp(Status=0xA700, ErrorComment="disk full"),
     StoreResponse(9, 0xA700, "disk full", UID)),
    (_pynetdicom_rsp(Status=0xB000, OffendingElement=[0x00100010]),
     StoreResponse(9, 0xB000, None, UID)),
    (_pynetdicom_rsp(Status=0xC000, ErrorID=7), StoreResponse(9, 0xC000, None, UID)),
    (c_store_rsp_command(message_id_being_responded_to=9, status=0x0107,
                         sop_class_uid=None, sop_instance_uid=None),
     StoreResponse(9, 0x0107, None, None)),
], ids=["success", "comment", "offending element", "error id", "no uids"])
def test_c_store_responses_are_read_as_pynetdicom_encodes_them(
    encoded: bytes, expected: StoreResponse
) -> None:
    assert parse_c_store_rsp(encoded) == expected


_STATUS = _element(0x0900, b"\x00\x00")
_MESSAGE = _element(0x0120, b"\x09\x00")
_RSP = _element(0x0100, b"\x01\x80")
_NO_DATA = _element(0x0800, b"\x01\x01")


@pytest.mark.parametrize("encoded", [
    pytest.param(_echo_rsp(), id="a C-ECHO response"),
    pytest.param(_RSP + _MESSAGE + _element(0x0800, b"\x00\x00") + _STATUS, id="a data set"),
    pytest.param(_RSP + _MESSAGE + _NO_DATA, id="no status"),
    pytest.param(_RSP + _NO_DATA + _STATUS, id="no message id"),
    pytest.param(_RSP + _MESSAGE + _NO_DATA + _element(0x0900, b"\x00"), id="short status"),
    pytest.param(_RSP + _MESSAGE + _NO_DATA + _STATUS + b"\x08\x00\x10\x00\x02\x00\x00\x00ab",
                 id="another group"),
    pytest.param((_RSP + _MESSAGE + _NO_DATA + _STATUS)[:-3], id="truncated"),
    pytest.param(_RSP + _MESSAGE + _NO_DATA + _STATUS + _STATUS, id="an element twice"),
])
def test_anything_else_is_not_a_c_store_response(encoded: bytes) -> None:
    assert parse_c_store_rsp(encoded) is None


def _pynetdicom_pdus(data: bytes, max_pdu: int) -> list[bytes]:
    """The P-DATA-TF PDUs pynetdicom sends for a C-STORE-RQ of *data*."""
    primitive = C_STORE()
    primitive.MessageID = 3
    primitive.Priority = 2
    primitive.AffectedSOPClassUID = CT
    primitive.AffectedSOPInstanceUID = UID
    primitive.DataSet = io.BytesIO(data)
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    pdus = []
    for pdata in message.encode_msg(5, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(pdata)
        pdus.append(pdu.encode())
    return pdus


@pytest.mark.parametrize("max_pdu", [0, 4096, 16384])
@pytest.mark.parametrize("length", [1, 4090, 4091, 10_000, 3 * 16378])
def test_requests_are_the_pdus_pynetdicom_sends(max_pdu: int, length: int) -> None:
    data = bytes(range(256)) * (length // 256 + 1)
    data = data[:length]
    expected = _pynetdicom_pdus(data, max_pdu)
    command = C_STORE_RQ()
    command_primitive = C_STORE()
    command_primitive.MessageID, command_primitive.Priority = 3, 2
    command_primitive.AffectedSOPClassUID, command_primitive.AffectedSOPInstanceUID = CT, UID
    command_primitive.DataSet = io.BytesIO(b"x")
    command.primitive_to_message(command_primitive)
    encoded_command = bytes(encode(command.command_set, True, True))
    ours = request_pdus(5, encoded_command, io.BytesIO(data), length, max_pdu)
    assert b"".join(ours) == b"".join(expected)


def test_fragments_are_at_most_a_mebibyte_when_the_peer_sets_no_smaller_limit() -> None:
    # A peer without a limit (0) or with a huge one: a 2.5 MiB data set is not read,
    # held and sent as one fragment.
    length = 2 * MAX_FRAGMENT + 1000
    for max_pdu in (0, 64 * 1024 * 1024):
        parts = list(request_pdus(1, b"cmd", io.BytesIO(bytes(length)), length, max_pdu))
        fragments = parts[2::2]
        assert [len(fragment) for fragment in fragments] == [MAX_FRAGMENT, MAX_FRAGMENT, 1000]
        assert [header[11] for header in parts[1::2]] == [0, 0, 2]


def test_a_stored_object_shorter_than_recorded_fails_before_its_end_is_sent() -> None:
    pdus = request_pdus(1, b"cmd", io.BytesIO(b"x" * 100), 200, 4096)
    next(pdus)
    with pytest.raises(OSError, match="ends before"):
        list(pdus)


# --- the lane on a socket pair, the test playing the DUL thread -----------------------


class _Dul:
    def __init__(self, sock: socket.socket) -> None:
        self.socket = SimpleNamespace(socket=sock)
        self.state_machine = SimpleNamespace(current_state="Sta6")
        self.event_queue: queue.Queue[str] = queue.Queue()
        self.to_provider_queue: queue.Queue[Any] = queue.Queue()
        self.alive = True

    def is_alive(self) -> bool:
        return self.alive


@pytest.fixture
def wire(tmp_path: Path) -> Iterator[tuple[SendLane, socket.socket, _Dul, Path]]:
    ours, peer = socket.socketpair()
    dul = _Dul(ours)
    assoc = SimpleNamespace(dul=dul, acceptor=SimpleNamespace(maximum_length=4096),
                            dimse=SimpleNamespace(maximum_pdu_size=4096))
    source = tmp_path / "object.dcm"
    source.write_bytes(b"\x00" * 200 + bytes(range(256)) * 40)
    yield SendLane(assoc), peer, dul, source
    ours.close()
    peer.close()


def _send(
    lane: SendLane, source: Path, timeout: float = 5.0
) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}
    command = lane.command(CT, UID)
    assert command is not None

    def run() -> None:
        try:
            outcome["response"] = lane.send(1, command, UID, source, offset=200,
                                            length=256 * 40, timeout=timeout)
        except SendLaneError as exc:
            outcome["error"] = str(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def _request_length(lane_limit: int, data_length: int) -> int:
    pdus = request_pdus(1, _command_for(1), io.BytesIO(bytes(data_length)), data_length,
                        lane_limit)
    return sum(len(pdu) for pdu in pdus)


def _read_request(peer: socket.socket, length: int) -> bytes:
    received = b""
    peer.settimeout(5)
    while len(received) < length:
        received += peer.recv(65536)
    return received


def _answer(lane: SendLane, *pdvs: tuple[int, bytes]) -> None:
    """What the DUL thread does with a P-DATA-TF holding *pdvs* (control, fragment)."""
    body = bytearray(b"".join(p_data_tf(1, control, fragment)[6:]
                              for control, fragment in pdvs))
    while not lane.waiting():
        threading.Event().wait(0.01)
    lane.receive(body)


def test_the_response_comes_back_to_the_sender(
    wire: tuple[SendLane, socket.socket, _Dul, Path]
) -> None:
    lane, peer, _dul, source = wire
    thread, outcome = _send(lane, source)
    _read_request(peer, _request_length(4096, 256 * 40))
    response = c_store_rsp_command(message_id_being_responded_to=1, status=0xB000,
                                   sop_class_uid=CT, sop_instance_uid=UID,
                                   error_comment="coerced")
    _answer(lane, (0x01, response[:10]))  # a command set in two fragments
    _answer(lane, (0x03, response[10:]))
    thread.join(5)
    assert outcome == {"response": StoreResponse(1, 0xB000, "coerced", UID)}
    assert lane.sent == 1


def _split_pdus(stream: bytes) -> list[bytes]:
    pdus, position = [], 0
    while position < len(stream):
        length = struct.unpack_from(">L", stream, position + 2)[0]
        pdus.append(stream[position:position + 6 + length])
        position += 6 + length
    return pdus


def test_the_data_set_sent_is_the_stored_one_in_fragments(
    wire: tuple[SendLane, socket.socket, _Dul, Path]
) -> None:
    lane, peer, _dul, source = wire
    thread, outcome = _send(lane, source)
    data = source.read_bytes()[200:]
    pdus = _split_pdus(_read_request(peer, _request_length(4096, len(data))))
    assert pdus[0][11:] == b"\x03" + _command_for(1)
    fragments = [(pdu[11], pdu[12:]) for pdu in pdus[1:]]
    assert b"".join(fragment for _, fragment in fragments) == data
    assert [control for control, _ in fragments] == [0] * (len(fragments) - 1) + [2]
    assert all(len(fragment) <= 4090 for _, fragment in fragments)
    _answer(lane, (0x03, c_store_rsp_command(message_id_being_responded_to=1, status=0,
                                             sop_class_uid=CT, sop_instance_uid=UID)))
    thread.join(5)
    assert outcome["response"].status == 0


def _command_for(message_id: int) -> bytes:
    return c_store_rq_command(message_id=message_id, priority=2, sop_class_uid=CT,
                              sop_instance_uid=UID)


@pytest.mark.parametrize(("pdvs", "reason"), [
    ([(0x03, c_store_rsp_command(message_id_being_responded_to=2, status=0,
                                 sop_class_uid=CT, sop_instance_uid=UID))],
     "another message"),
    ([(0x03, c_store_rsp_command(message_id_being_responded_to=1, status=0,
                                 sop_class_uid=CT, sop_instance_uid="1.2.3.9"))],
     "another SOP instance"),
    ([(0x02, b"\x08\x00\x10\x00")], "a data set"),
    ([(0x03, b"\x00\x00\x00\x00\x04\x00")], "not a C-STORE response"),
])
def test_a_wrong_response_fails_the_send(
    wire: tuple[SendLane, socket.socket, _Dul, Path], pdvs: list[tuple[int, bytes]],
    reason: str,
) -> None:
    lane, _peer, dul, source = wire
    thread, outcome = _send(lane, source)
    _answer(lane, *pdvs)
    thread.join(5)
    assert reason in outcome["error"]
    # The sender aborts the association (DestinationLink); the DUL thread, which may
    # be reading while the sender still writes, does not.
    assert dul.event_queue.empty()


def test_no_response_in_time_fails_the_send(
    wire: tuple[SendLane, socket.socket, _Dul, Path]
) -> None:
    lane, _peer, _dul, source = wire
    thread, outcome = _send(lane, source, timeout=0.3)
    thread.join(5)
    assert "no response within 0.3 s" in outcome["error"]
    assert not lane.waiting()


@pytest.mark.parametrize("ending", ["DUL thread ended", "state left Sta6", "closed"])
def test_the_association_ending_while_waiting_fails_the_send_at_once(
    wire: tuple[SendLane, socket.socket, _Dul, Path], ending: str
) -> None:
    lane, _peer, dul, source = wire
    thread, outcome = _send(lane, source, timeout=30)
    while not lane.waiting():
        threading.Event().wait(0.01)
    if ending == "DUL thread ended":
        dul.alive = False
    elif ending == "state left Sta6":
        dul.state_machine.current_state = "Sta1"
    else:
        lane.close()
    thread.join(5)
    assert not thread.is_alive()
    assert "ended while waiting" in outcome["error"]


def test_a_missing_source_fails_before_anything_is_sent(
    wire: tuple[SendLane, socket.socket, _Dul, Path], tmp_path: Path
) -> None:
    lane, peer, _dul, _source = wire
    command = lane.command(CT, UID) or b""
    with pytest.raises(FileNotFoundError):
        lane.send(1, command, UID, tmp_path / "gone.dcm", offset=200, length=10, timeout=1)
    peer.setblocking(False)
    with pytest.raises(BlockingIOError):
        peer.recv(10)
    assert not lane.waiting()


def test_message_ids_count_up_and_wrap() -> None:
    assoc = SimpleNamespace(dul=SimpleNamespace(to_provider_queue=queue.Queue()),
                            acceptor=SimpleNamespace(maximum_length=0),
                            dimse=SimpleNamespace(maximum_pdu_size=0))
    lane = SendLane(assoc)
    ids = []
    for _ in range(3):
        command = lane.command(CT, UID)
        assert command is not None
        ids.append(struct.unpack_from("<H", command, command.index(b"\x10\x01") + 6)[0])
    lane._message_id = 0xFFFF
    assert lane.command(CT, UID) is not None and lane._message_id == 1
    assert ids == [1, 2, 3]


def test_a_uid_outside_the_plain_shape_is_left_to_pynetdicom() -> None:
    assoc = SimpleNamespace(dul=SimpleNamespace(to_provider_queue=queue.Queue()),
                            acceptor=SimpleNamespace(maximum_length=0),
                            dimse=SimpleNamespace(maximum_pdu_size=0))
    assert SendLane(assoc).command(CT, "1.2.3.x") is None


def test_a_destination_that_stops_reading_fails_the_send_in_time(
    wire: tuple[SendLane, socket.socket, _Dul, Path], tmp_path: Path
) -> None:
    lane, peer, _dul, _source = wire
    big = tmp_path / "big.dcm"
    big.write_bytes(bytes(200 + 20 * 1024 * 1024))  # far more than the socket buffers
    command = lane.command(CT, UID) or b""
    started = time.monotonic()
    with pytest.raises(SendStalledError, match=r"took no data for 0\.5 s"):
        lane.send(1, command, UID, big, offset=200, length=20 * 1024 * 1024, timeout=0.5)
    assert time.monotonic() - started < 5
    peer.settimeout(5)
    while peer.recv(1 << 20):  # the connection was shut: the peer reads to its end
        pass
    assert not lane.waiting()


def test_the_lane_waits_its_turn_behind_pdus_pynetdicom_queued() -> None:
    dul = SimpleNamespace(to_provider_queue=queue.Queue())
    assoc = SimpleNamespace(dul=dul, acceptor=SimpleNamespace(maximum_length=0),
                            dimse=SimpleNamespace(maximum_pdu_size=0))
    lane = SendLane(assoc)
    assert lane.command(CT, UID) is not None
    dul.to_provider_queue.put("a P-DATA of a message pynetdicom is sending")
    assert lane.command(CT, UID) is None
