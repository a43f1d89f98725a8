"""The hand encoders produce exactly pydicom's and pynetdicom's bytes."""

from __future__ import annotations

import io
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydicom.filewriter import write_file_meta_info
from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta, encode
from pynetdicom.dsutils import split_dataset as pynetdicom_split_dataset

from gateway.dimse_codec import (
    _fast_c_store_rq,
    c_store_rq_command,
    c_store_rsp_command,
    file_meta_bytes,
    split_dataset,
)
from tests.helpers.data import sample

CT = "1.2.840.10008.5.1.4.1.1.2"  # even length
MR = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED = "1.2.840.10008.5.1.4.1.1.2.1"  # odd length
EXPLICIT = "1.2.840.10008.1.2.1"  # odd
JPEG2000 = "1.2.840.10008.1.2.4.90"  # even
IMPLICIT = "1.2.840.10008.1.2"

FILE_META_CASES = [
    (CT, "1.2.3.4", EXPLICIT, "1.2.826.0.1.3680043.9.3811.3.0.4", "PYNETDICOM_304"),
    (ENHANCED, "1.2.3.45", JPEG2000, "1.2.3", "ODD"),
    (MR, "2.25.123456789012345678901234567890123456", IMPLICIT, "1.2.34", "EVENNAME"),
    (MR, "1.2." + "9" * 58, EXPLICIT, "1.2.826.0.1.3680043.8.498.1", "GATEWAY_1"),
]


@pytest.mark.parametrize(("sop_class", "sop_instance", "syntax", "uid", "version"),
                         FILE_META_CASES)
def test_file_meta_is_written_as_pydicom_writes_it(
    sop_class: str, sop_instance: str, syntax: str, uid: str, version: str
) -> None:
    expected = io.BytesIO()
    write_file_meta_info(expected, create_file_meta(  # type: ignore[arg-type]
        sop_class_uid=sop_class, sop_instance_uid=sop_instance, transfer_syntax=syntax,
        implementation_uid=uid, implementation_version=version))
    assert file_meta_bytes(
        sop_class_uid=sop_class, sop_instance_uid=sop_instance, transfer_syntax=syntax,
        implementation_uid=uid, implementation_version=version,
    ) == expected.getvalue()


RSP_CASES = [
    (1, 0x0000, CT, "1.2.3.4"),
    (65535, 0xB000, ENHANCED, "1.2.3.45"),
    (7, 0xA700, MR, None),
    (8, 0xC000, None, "1.2.3.4"),
    (9, 0x0122, None, None),
]


@pytest.mark.parametrize(("message_id", "status", "sop_class", "sop_instance"), RSP_CASES)
def test_c_store_rsp_is_encoded_as_pynetdicom_encodes_it(
    message_id: int, status: int, sop_class: str | None, sop_instance: str | None
) -> None:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = message_id
    primitive.Status = status
    if sop_class is not None:
        primitive.AffectedSOPClassUID = sop_class
    if sop_instance is not None:
        primitive.AffectedSOPInstanceUID = sop_instance
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    expected = encode(message.command_set, True, True)
    assert c_store_rsp_command(
        message_id_being_responded_to=message_id, status=status,
        sop_class_uid=sop_class, sop_instance_uid=sop_instance,
    ) == expected


@pytest.mark.parametrize(("values", "plain"), [
    ((CT, "1.2.3"), True),
    ((None, "1.2.3"), True),
    (("1.2.3\\4.5",), False),      # a multi-valued UID
    (("",), False),
    (("1.2.3é",), False),          # not ASCII
    (("1.2." + "3" * 62,), False),  # 65 characters
    ((b"1.2.3",), False),
])
def test_only_plain_uids_take_the_hand_encoders(values: tuple[object, ...], plain: bool) -> None:
    from gateway.dimse_codec import plain_uids

    assert plain_uids(*values) is plain


# --- sending ---------------------------------------------------------------------------

RQ_CASES = [
    (1, 2, CT, "1.2.3.4"),          # medium priority (the default), even UIDs
    (65535, 0, ENHANCED, "1.2.3.45"),  # odd-length UIDs are padded
    (7, 1, MR, "2.25.123456789012345678901234567890123456"),
    (300, 2, MR, "1.2." + "9" * 60),
]


@pytest.mark.parametrize(("message_id", "priority", "sop_class", "sop_instance"), RQ_CASES)
def test_c_store_rq_is_encoded_as_pynetdicom_encodes_it(
    message_id: int, priority: int, sop_class: str, sop_instance: str, tmp_path: Path
) -> None:
    primitive = _store_request(message_id, priority, sop_class, sop_instance,
                               path=tmp_path / "f")
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    expected = encode(message.command_set, True, True)
    assert c_store_rq_command(
        message_id=message_id, priority=priority, sop_class_uid=sop_class,
        sop_instance_uid=sop_instance,
    ) == expected


@pytest.mark.parametrize(("length", "max_pdu"), [
    (0, 16384), (1, 16384), (16378, 16384), (16379, 16384), (2 * 16378, 16384),
    (100_000, 16384), (100_000, 0), (5000, 4096), (70_000, 262144),
])
def test_a_stored_file_is_sent_in_pynetdicoms_pdvs(
    length: int, max_pdu: int, tmp_path: Path
) -> None:
    offset = 132 + 60  # where the data set starts in the file
    path = tmp_path / "instance.dcm"
    path.write_bytes(b"M" * offset + bytes(index % 251 for index in range(length)))
    primitive = _store_request(9, 2, CT, "1.2.3.4", path=path, offset=offset)
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    expected = [pdata.presentation_data_value_list
                for pdata in message.encode_msg(1, max_pdu)]
    provider = _Provider(max_pdu)
    assert _fast_c_store_rq(provider, primitive, 1)
    assert [pdata.presentation_data_value_list for pdata in provider.sent] == expected


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_requests_outside_the_fixed_shape_take_pynetdicoms_path(tmp_path: Path) -> None:
    path = tmp_path / "instance.dcm"
    path.write_bytes(b"x" * 200)

    def request(**changes: object) -> C_STORE:
        primitive = _store_request(1, 2, CT, "1.2.3", path=path)
        for name, value in changes.items():
            setattr(primitive, name, value)
        return primitive

    in_memory = _store_request(1, 2, CT, "1.2.3", path=path)
    in_memory._dataset_path = None
    in_memory.DataSet = io.BytesIO(b"\x08\x00\x16\x00")
    for primitive in (
        request(MoveOriginatorApplicationEntityTitle="MOVESCU"),
        request(MoveOriginatorMessageID=3),
        request(AffectedSOPInstanceUID="1.2.3.4\\5"),
        in_memory,
    ):
        assert not _fast_c_store_rq(_Provider(16384), primitive, 1)
    # A PDU too small for the command set, and an observer of sent messages.
    assert not _fast_c_store_rq(_Provider(60), request(), 1)
    assert not _fast_c_store_rq(_Provider(16384, observed=True), request(), 1)
    assert _fast_c_store_rq(_Provider(16384), request(), 1)


@pytest.mark.parametrize("name", [
    "CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "rtplan.dcm", "SC_rgb_rle.dcm",
])
def test_the_meta_group_of_a_file_to_send_is_read_as_pynetdicom_reads_it(name: str) -> None:
    path = sample(name)
    meta, offset = split_dataset(path)
    expected_meta, expected_offset = pynetdicom_split_dataset(path)
    assert offset == expected_offset
    for keyword in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID",
                    "TransferSyntaxUID"):
        assert meta[keyword].value == expected_meta[keyword].value


def test_files_the_fast_reader_refuses_go_to_pynetdicoms_reader(tmp_path: Path) -> None:
    no_preamble = tmp_path / "raw.dcm"
    no_preamble.write_bytes(b"\x08\x00\x16\x00UI\x04\x001.2\x00")
    with pytest.raises(Exception) as fast:
        split_dataset(no_preamble)
    with pytest.raises(Exception) as original:
        pynetdicom_split_dataset(no_preamble)
    assert type(fast.value) is type(original.value)


def _store_request(message_id: int, priority: int, sop_class: str, sop_instance: str, *,
                   path: Path, offset: int = 132) -> C_STORE:
    primitive = C_STORE()
    primitive.MessageID = message_id
    primitive.Priority = priority
    primitive.AffectedSOPClassUID = sop_class
    primitive.AffectedSOPInstanceUID = sop_instance
    primitive._dataset_path = (path, offset)
    return primitive


class _Provider:
    """What _fast_c_store_rq uses of pynetdicom's DIMSE provider: PDUs go to a list."""

    def __init__(self, maximum_pdu_size: int, *, observed: bool = False) -> None:
        self.maximum_pdu_size = maximum_pdu_size
        self.sent: list[Any] = []
        self.dul = SimpleNamespace(send_pdu=self.sent.append)
        self.assoc = SimpleNamespace(get_handlers=lambda event: [print] if observed else [])


def _part10(tmp_path: Path, extra_meta: bytes, data_set: bytes) -> Path:
    meta = file_meta_bytes(sop_class_uid=CT, sop_instance_uid="1.2.3.4", transfer_syntax=EXPLICIT,
                           implementation_uid="1.2.3", implementation_version="X")
    path = tmp_path / "instance.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + meta + extra_meta + data_set)
    return path


def _explicit_element(element: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2sHI", 2, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 2, element, vr, len(value)) + value


@pytest.mark.parametrize("case", ["meta group across the read", "data set shorter than a tag"])
def test_edge_files_get_pynetdicoms_offset(case: str, tmp_path: Path) -> None:
    data_set = b"\x08\x00\x16\x00UI\x04\x001.2\x00" * 4
    if case == "meta group across the read":
        # A 16 KiB meta group whose next element starts in the last 8 bytes of the head
        # the fast reader looks at: only the general reader can tell where it ends.
        start = len(_part10(tmp_path, b"", b"").read_bytes())  # where the extra begins
        filler = 16 * 1024 - 4 - start - 8
        extra = (_explicit_element(0x0100, b"UI", b"1" * filler)
                 + _explicit_element(0x0102, b"OB", b"\x01" * 100))
    else:
        extra, data_set = b"", b"\x08\x00\x16\x00"
    path = _part10(tmp_path, extra, data_set)
    assert split_dataset(path)[1] == pynetdicom_split_dataset(path)[1]
