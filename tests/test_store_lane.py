"""The C-STORE lane: plain C-STOREs received and answered on the DUL thread, everything
else left to pynetdicom, protocol errors aborting only their association."""

from __future__ import annotations

import io
import itertools
import os
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pynetdicom import evt
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA

from gateway import store_lane
from gateway.dimse_codec import c_store_rsp_command, p_data_tf
from gateway.store_lane import (
    ProtocolError,
    StoreCommand,
    StoreLane,
    parse_store_command,
    pdv_items,
)
from tests.helpers.parrot import (
    c_echo_command,
    c_store_command,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"


def _request(message_id: int = 7, priority: int = 2, sop_class: str = CT,
             sop_instance: str = "1.2.3.4", move_originator: str | None = None) -> bytes:
    primitive = C_STORE()
    primitive.MessageID = message_id
    primitive.Priority = priority
    primitive.AffectedSOPClassUID = sop_class
    primitive.AffectedSOPInstanceUID = sop_instance
    primitive.DataSet = io.BytesIO(b"\x08\x00")  # only its presence matters here
    if move_originator is not None:
        primitive.MoveOriginatorApplicationEntityTitle = move_originator
        primitive.MoveOriginatorMessageID = 3
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    return bytes(encode(message.command_set, True, True))


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


PARSED = [
    ("pynetdicom's encoding", _request(), StoreCommand(7, CT, "1.2.3.4")),
    ("odd-length UIDs, low priority", _request(65535, 1, MR, "1.2.3.45"),
     StoreCommand(65535, MR, "1.2.3.45")),
    ("a C-STORE of a C-MOVE", _request(move_originator="MOVESCU"),
     StoreCommand(7, CT, "1.2.3.4")),
    ("with the group length", c_store_command(CT, "1.2.3.4", 9), StoreCommand(9, CT, "1.2.3.4")),
    ("UID padded with a space", _request().replace(b"1.2.3.4\x00", b"1.2.3.4 "),
     StoreCommand(7, CT, "1.2.3.4")),
]

NOT_PLAIN = [
    ("a C-ECHO", c_echo_command()),
    ("no data set", _request().replace(
        _element(0x0800, b"\x01\x00"), _element(0x0800, b"\x01\x01"))),
    ("an element outside a C-STORE-RQ", _request() + _element(0x0902, b"AB")),
    ("an element twice", _request() + _element(0x0110, b"\x01\x00")),
    ("a truncated element header", _request() + b"\x00\x00\x10"),
    ("a value running past the end", _request()[:-4]),
    ("a UID with letters", _request().replace(b"1.2.3.4", b"1.2.a.4")),
    ("a UID that is not ASCII", _request().replace(b"1.2.3.4", b"1.2.\xe9.4")),
    ("an empty UID", _request().replace(_element(0x1000, b"1.2.3.4\x00"), _element(0x1000, b""))),
    ("a US value of three bytes", _request().replace(
        _element(0x0110, b"\x07\x00"), _element(0x0110, b"\x07\x00\x00") + b"\x00")),
    ("priority 3", _request().replace(_element(0x0700, b"\x02\x00"),
                                      _element(0x0700, b"\x03\x00"))),
    ("no message ID", _request().replace(_element(0x0110, b"\x07\x00"), b"")),
    ("no SOP Instance UID", _request().replace(_element(0x1000, b"1.2.3.4\x00"), b"")),
    ("an element of group 0008", _request() + struct.pack("<HHI", 0x0008, 0x0016, 0)),
    ("nothing", b""),
]


@pytest.mark.parametrize(("case", "encoded", "expected"), PARSED, ids=[c[0] for c in PARSED])
def test_plain_c_store_requests_are_read_from_their_command_set(
    case: str, encoded: bytes, expected: StoreCommand
) -> None:
    assert parse_store_command(encoded) == expected


@pytest.mark.parametrize(("case", "encoded"), NOT_PLAIN, ids=[c[0] for c in NOT_PLAIN])
def test_anything_else_is_left_to_pynetdicom(case: str, encoded: bytes) -> None:
    assert parse_store_command(encoded) is None


def _encoded_pdu(*values: tuple[int, bytes]) -> bytes:
    primitive = P_DATA()
    primitive.presentation_data_value_list.extend(values)
    pdu = P_DATA_TF()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def test_pdv_items_are_read_as_pynetdicom_encodes_them() -> None:
    values = [(1, b"\x03command"), (1, b"\x00data"), (3, b"\x02"), (5, b"\x01" + b"x" * 300)]
    pdu = _encoded_pdu(*values)
    assert [(cx, control, bytes(pdv)) for cx, control, pdv in pdv_items(pdu[6:])] == [
        (cx, value[0], value) for cx, value in values
    ]


@pytest.mark.parametrize("body", [
    b"\x00\x00\x00\x05\x01",                      # shorter than an item header
    b"\x00\x00\x00\x01\x01\x03",                  # length below context ID + control
    b"\x00\x00\x00\x09\x01\x03abc",               # length beyond the PDU
    b"\x00\x00\x00\x03\x01\x03a" + b"\x00\x00",   # trailing bytes that are no item
])
def test_malformed_pdv_items_are_protocol_errors(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        list(pdv_items(body))


@pytest.mark.parametrize(("comment", "status"), [
    ("SOP Class UID in the dataset differs from the C-STORE request", 0xA900),
    ("odd", 0xA700),
    ("even", 0xC000),
])
def test_responses_with_an_error_comment_are_encoded_as_pynetdicom_encodes_them(
    comment: str, status: int
) -> None:
    from pynetdicom.dimse_messages import C_STORE_RSP
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = 5
    primitive.Status = status
    primitive.AffectedSOPClassUID = CT
    primitive.AffectedSOPInstanceUID = "1.2.3.45"
    primitive.ErrorComment = comment
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    expected = encode(message.command_set, True, True)
    assert c_store_rsp_command(
        message_id_being_responded_to=5, status=status, sop_class_uid=CT,
        sop_instance_uid="1.2.3.45", error_comment=comment,
    ) == expected


def test_a_long_or_non_ascii_comment_is_cut_to_its_vr() -> None:
    encoded = c_store_rsp_command(message_id_being_responded_to=1, status=0xA900,
                                  sop_class_uid=None, sop_instance_uid=None,
                                  error_comment="é" + "x" * 100)
    assert _element(0x0902, b"?" + b"x" * 63) in encoded


def test_the_response_pdu_is_the_one_pdv_pynetdicom_would_send() -> None:
    command = c_store_rsp_command(message_id_being_responded_to=1, status=0,
                                  sop_class_uid=CT, sop_instance_uid="1.2.3.4")
    assert p_data_tf(3, 0x03, command) == _encoded_pdu((3, b"\x03" + command))


def test_the_lane_is_not_attached_when_a_bypassed_event_has_a_handler() -> None:
    assert store_lane.install()
    lane = StoreLane(Path("/nonexistent"), lambda received: (0, None))
    for bound, attached in ((evt.EVT_PDU_RECV, False), (evt.EVT_DIMSE_SENT, False),
                            (evt.EVT_C_STORE, True)):
        bindings: list[Any] = []
        assoc = SimpleNamespace(
            dul=SimpleNamespace(),
            get_handlers=lambda event, bound=bound: [print] if event == bound else [],
            bind=lambda event, handler, bindings=bindings: bindings.append(event),
        )
        assert store_lane.attach(assoc, lane) is attached
        assert (store_lane.lane_of(assoc) is lane) is attached
        # Told when the association is established, aborted or released.
        assert bindings == ([evt.EVT_ESTABLISHED, evt.EVT_ABORTED, evt.EVT_RELEASED]
                            if attached else [])


def test_received_files_get_new_names_past_any_left_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_lane, "_serial", itertools.count(5))
    (tmp_path / f"lane-{os.getpid()}-5.dcm").write_bytes(b"left by an earlier process")
    fd, path = store_lane._create(tmp_path)
    os.close(fd)
    assert path.name == f"lane-{os.getpid()}-6.dcm"
    assert (tmp_path / f"lane-{os.getpid()}-5.dcm").read_bytes() == b"left by an earlier process"
    assert path.stat().st_size == 0


@pytest.mark.parametrize(("sop_class", "storage"), [
    (CT, True), (MR, True), ("1.2.840.10008.5.1.4.1.1.88.11", True),
    ("1.2.840.10008.1.1", False),  # Verification: pynetdicom refuses a C-STORE of it
    ("1.2.3.4.5", False),  # unknown: pynetdicom decides
])
def test_only_storage_sop_classes_take_the_lane(sop_class: str, storage: bool) -> None:
    assert store_lane._is_storage(sop_class) is storage


def test_error_comments_hold_only_what_lo_allows() -> None:
    encoded = c_store_rsp_command(message_id_being_responded_to=1, status=0xA900,
                                  sop_class_uid=None, sop_instance_uid=None,
                                  error_comment="a\\b\tc")
    assert _element(0x0902, b"a?b?c ") in encoded
