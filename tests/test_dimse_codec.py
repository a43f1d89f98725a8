"""The hand encoders produce exactly pydicom's and pynetdicom's bytes."""

from __future__ import annotations

import io

import pytest
from pydicom.filewriter import write_file_meta_info
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta, encode

from gateway.dimse_codec import c_store_rsp_command, file_meta_bytes

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
    from gateway.dimse_codec import _plain_uids

    assert _plain_uids(*values) is plain
