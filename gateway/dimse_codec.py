"""Hand-encoded bytes for the fixed-shape encodings of every instance received or sent.

For each C-STORE, pynetdicom builds pydicom datasets only to encode them: the file meta
group written in front of the received data set (``create_file_meta`` and
``write_file_meta_info``), and the C-STORE-RSP command set (built, encoded once for its
group length and once more to send). That was about a fifth of the receive path's
interpreter time per small instance. Sending is the same: the C-STORE-RQ command set is
built and encoded twice, and the file's meta group is parsed with pydicom
(``split_dataset``) to find where the data set starts. All have a fixed shape, so they
are encoded (and the meta group read) here directly: the encoders are pure and tested
byte for byte against pydicom's and pynetdicom's own output. Anything outside the fixed
shape (an error comment, an offending element, a move originator, a UID that is not
digits and dots, a PDU too small for the command set, an observer of sent messages, a
file that is not Part 10) takes pynetdicom's path unchanged.

:func:`install` wires them into pynetdicom for the versions they were tested with
(:data:`gateway.dimse_reactor.SUPPORTED_VERSIONS`).
"""

from __future__ import annotations

import re
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pynetdicom
from pydicom.dataset import Dataset
from pynetdicom import association as _association
from pynetdicom import dimse as _dimse
from pynetdicom import dimse_messages as _dimse_messages
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

from gateway.dicom.header import HeaderError, read_file_meta
from gateway.dimse_reactor import SUPPORTED_VERSIONS

_C_STORE_RQ = 0x0001
_C_STORE_RSP = 0x8001
_NO_DATA_SET = 0x0101
_DATA_SET_PRESENT = 0x0001
# PS3.8 E.2 message control headers
_COMMAND_LAST_FRAGMENT = b"\x03"
_DATA_FRAGMENT = b"\x00"
_DATA_LAST_FRAGMENT = b"\x02"

_UID = re.compile(r"[0-9.]{1,64}")
ERROR_COMMENT_MAX = 64  # (0000,0902) is LO
_META_READ = 16 * 1024  # a meta group longer than this goes to pynetdicom's reader
_original_split_dataset = _association.split_dataset

_install_lock = threading.Lock()
_installed = False


def plain_uids(*values: object) -> bool:
    """Every value a well-formed UID string (or absent): the fixed shape."""
    return all(value is None or (isinstance(value, str) and _UID.fullmatch(value) is not None)
               for value in values)


def _padded(value: str, pad: bytes) -> bytes:
    encoded = value.encode("ascii")
    return encoded + pad if len(encoded) % 2 else encoded


def _explicit(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"UN", b"OW", b"SQ", b"UT"):
        return struct.pack("<HH2sHI", group, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def file_meta_bytes(*, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str,
                    implementation_uid: str, implementation_version: str) -> bytes:
    """The File Meta Information group (0002) as pydicom writes it after the preamble:
    explicit VR little endian, UIDs padded with NUL, the version name with a space."""
    body = b"".join((
        _explicit(0x0002, 0x0001, b"OB", b"\x00\x01"),
        _explicit(0x0002, 0x0002, b"UI", _padded(sop_class_uid, b"\x00")),
        _explicit(0x0002, 0x0003, b"UI", _padded(sop_instance_uid, b"\x00")),
        _explicit(0x0002, 0x0010, b"UI", _padded(transfer_syntax, b"\x00")),
        _explicit(0x0002, 0x0012, b"UI", _padded(implementation_uid, b"\x00")),
        _explicit(0x0002, 0x0013, b"SH", _padded(implementation_version, b" ")),
    ))
    return _explicit(0x0002, 0x0000, b"UL", struct.pack("<I", len(body))) + body


def _implicit(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def c_store_rsp_command(*, message_id_being_responded_to: int, status: int,
                        sop_class_uid: str | None, sop_instance_uid: str | None,
                        error_comment: str | None = None) -> bytes:
    """A C-STORE-RSP command set without offending element, implicit VR little endian
    (PS3.7 9.3.1.2, E.1), as pynetdicom encodes it. An error comment (LO) is cut to its
    64 characters; a character LO does not allow (outside printable ASCII, or a
    backslash) becomes ``?``."""
    elements = []
    if sop_class_uid is not None:
        elements.append(_implicit(0x0002, _padded(sop_class_uid, b"\x00")))
    elements.append(_implicit(0x0100, struct.pack("<H", _C_STORE_RSP)))
    elements.append(_implicit(0x0120, struct.pack("<H", message_id_being_responded_to)))
    elements.append(_implicit(0x0800, struct.pack("<H", _NO_DATA_SET)))
    elements.append(_implicit(0x0900, struct.pack("<H", status)))
    if error_comment:
        # LO: no backslash (the value delimiter) and no control characters.
        text = "".join(c if " " <= c <= "~" and c != "\\" else "?" for c in error_comment)
        comment = text[:ERROR_COMMENT_MAX].encode("ascii", "replace")
        elements.append(_implicit(0x0902, comment + b" " if len(comment) % 2 else comment))
    if sop_instance_uid is not None:
        elements.append(_implicit(0x1000, _padded(sop_instance_uid, b"\x00")))
    body = b"".join(elements)
    return _implicit(0x0000, struct.pack("<I", len(body))) + body


def c_store_rq_command(*, message_id: int, priority: int, sop_class_uid: str,
                       sop_instance_uid: str) -> bytes:
    """A C-STORE-RQ command set with a data set and no move originator, implicit VR
    little endian (PS3.7 9.3.1.1, E.1), as pynetdicom encodes it."""
    body = b"".join((
        _implicit(0x0002, _padded(sop_class_uid, b"\x00")),
        _implicit(0x0100, struct.pack("<H", _C_STORE_RQ)),
        _implicit(0x0110, struct.pack("<H", message_id)),
        _implicit(0x0700, struct.pack("<H", priority)),
        _implicit(0x0800, struct.pack("<H", _DATA_SET_PRESENT)),
        _implicit(0x1000, _padded(sop_instance_uid, b"\x00")),
    ))
    return _implicit(0x0000, struct.pack("<I", len(body))) + body


def data_set_fragments(stream: BinaryIO, length: int, max_pdu_length: int) -> Iterator[bytes]:
    """PDVs (control header + bytes) of a data set of *length* bytes read from *stream*,
    split as pynetdicom splits them: at most ``max_pdu_length - 6`` bytes each, one
    fragment when the maximum is 0 (unlimited), the last one flagged."""
    size = length if max_pdu_length == 0 else max_pdu_length - 6
    count = 1 if max_pdu_length == 0 else max(1, -(-length // size))
    for index in range(count):
        header = _DATA_LAST_FRAGMENT if index == count - 1 else _DATA_FRAGMENT
        yield header + stream.read(size)


def _fast_c_store_rq(provider: Any, primitive: Any, context_id: int) -> bool:
    """Send a C-STORE-RQ of a data set in a file (``send_c_store(path)``) with the command
    set hand-encoded and the data set read straight from the file; else False."""
    source = getattr(primitive, "_dataset_path", None)
    if (
        not isinstance(primitive, C_STORE)
        or primitive.MessageIDBeingRespondedTo is not None
        or source is None
        or primitive.DataSet is not None
        or not isinstance(primitive.MessageID, int)
        or not isinstance(primitive.Priority, int)
        or primitive.MoveOriginatorApplicationEntityTitle is not None
        or primitive.MoveOriginatorMessageID is not None
        or provider.assoc.get_handlers(evt.EVT_DIMSE_SENT)
        or not plain_uids(primitive.AffectedSOPClassUID, primitive.AffectedSOPInstanceUID)
        or primitive.AffectedSOPClassUID is None
        or primitive.AffectedSOPInstanceUID is None
    ):
        return False
    command = c_store_rq_command(
        message_id=primitive.MessageID,
        priority=primitive.Priority,
        sop_class_uid=primitive.AffectedSOPClassUID,
        sop_instance_uid=primitive.AffectedSOPInstanceUID,
    )
    if not fits(provider, command):
        return False
    path, offset = source
    # Opened before anything is sent: a missing file fails the send, not half a message.
    with open(path, "rb") as stream:
        length = stream.seek(0, 2) - stream.seek(offset)
        send_pdv(provider, context_id, _COMMAND_LAST_FRAGMENT + command)
        for fragment in data_set_fragments(stream, length, provider.maximum_pdu_size):
            send_pdv(provider, context_id, fragment)
    return True


def p_data_tf(context_id: int, control: int, fragment: bytes | memoryview) -> bytes:
    """A P-DATA-TF PDU holding one PDV: message control header *control*, then
    *fragment* (PS3.8 9.3.5, E.2)."""
    return struct.pack(">BBLLBB", 0x04, 0, len(fragment) + 6, len(fragment) + 2,
                       context_id, control) + fragment


def fits(provider: Any, command: bytes) -> bool:
    """Whether *command* fits in one PDV under the peer's maximum PDU (0: no limit)."""
    limit = provider.maximum_pdu_size
    return not limit or len(command) + 6 <= limit


def send_pdv(provider: Any, context_id: int, value: bytes) -> None:
    """Queue one P-DATA-TF holding one PDV (message control header + fragment)."""
    pdata = P_DATA()
    pdata.presentation_data_value_list.append((context_id, value))
    provider.dul.send_pdu(pdata)


def split_dataset(path: Path) -> tuple[Dataset, int]:
    """pynetdicom's ``split_dataset`` (the file meta group and the data set's offset),
    read with the gateway's header reader; pynetdicom's own for anything it refuses."""
    with open(path, "rb") as stream:
        head = stream.read(_META_READ)
        try:
            meta, offset = read_file_meta(head)
        except HeaderError:
            meta = None
    if meta is None or offset + 8 > len(head):
        # Not Part 10, or the read may have ended inside the meta group (the reader
        # stops short of a partial element header): the general reader decides.
        original: tuple[Dataset, int] = _original_split_dataset(path)
        return original
    return meta, offset


@dataclass(frozen=True)
class _FileMeta:
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    implementation_uid: str
    implementation_version: str


def _fast_c_store_rsp(provider: Any, primitive: Any, context_id: int) -> bool:
    """Send *primitive* as hand-encoded bytes when it has the fixed shape; else False."""
    if (
        not isinstance(primitive, C_STORE)
        or primitive.MessageIDBeingRespondedTo is None
        or primitive.Status is None
        or primitive.ErrorComment is not None
        or primitive.OffendingElement is not None
        or provider.assoc.get_handlers(evt.EVT_DIMSE_SENT)
        or not plain_uids(primitive.AffectedSOPClassUID, primitive.AffectedSOPInstanceUID)
    ):
        return False
    command = c_store_rsp_command(
        message_id_being_responded_to=primitive.MessageIDBeingRespondedTo,
        status=primitive.Status,
        sop_class_uid=primitive.AffectedSOPClassUID,
        sop_instance_uid=primitive.AffectedSOPInstanceUID,
    )
    if not fits(provider, command):
        return False
    send_pdv(provider, context_id, _COMMAND_LAST_FRAGMENT + command)
    return True


def install() -> bool:
    """Wire the encoders into pynetdicom (idempotent). False when this pynetdicom version
    is not one they were tested with; pynetdicom's own encoding then stays."""
    global _installed  # noqa: PLW0603 - pynetdicom's module functions are process-wide
    with _install_lock:
        if _installed:
            return True
        if getattr(pynetdicom, "__version__", "") not in SUPPORTED_VERSIONS:
            return False
        original_create = _dimse_messages.create_file_meta
        original_write = _dimse_messages.write_file_meta_info
        original_send = _dimse.DIMSEServiceProvider.send_msg

        def create_file_meta(**kwargs: Any) -> Any:
            uids = (kwargs.get("sop_class_uid"), kwargs.get("sop_instance_uid"),
                    kwargs.get("transfer_syntax"), kwargs.get("implementation_uid"))
            if not plain_uids(*uids):
                return original_create(**kwargs)
            try:
                return _FileMeta(
                    str(kwargs["sop_class_uid"]), str(kwargs["sop_instance_uid"]),
                    str(kwargs["transfer_syntax"]),
                    str(kwargs.get("implementation_uid",
                                   pynetdicom.PYNETDICOM_IMPLEMENTATION_UID)),
                    str(kwargs.get("implementation_version",
                                   pynetdicom.PYNETDICOM_IMPLEMENTATION_VERSION)),
                )
            except (KeyError, TypeError):
                return original_create(**kwargs)

        def write_file_meta_info(fp: BinaryIO, file_meta: Any, *args: Any, **kwargs: Any) -> None:
            if isinstance(file_meta, _FileMeta) and not args and not kwargs:
                fp.write(file_meta_bytes(
                    sop_class_uid=file_meta.sop_class_uid,
                    sop_instance_uid=file_meta.sop_instance_uid,
                    transfer_syntax=file_meta.transfer_syntax,
                    implementation_uid=file_meta.implementation_uid,
                    implementation_version=file_meta.implementation_version,
                ))
                return
            if isinstance(file_meta, _FileMeta):
                file_meta = original_create(
                    sop_class_uid=file_meta.sop_class_uid,
                    sop_instance_uid=file_meta.sop_instance_uid,
                    transfer_syntax=file_meta.transfer_syntax,
                    implementation_uid=file_meta.implementation_uid,
                    implementation_version=file_meta.implementation_version,
                )
            original_write(fp, file_meta, *args, **kwargs)

        def send_msg(self: Any, primitive: Any, context_id: int) -> None:
            if not (_fast_c_store_rsp(self, primitive, context_id)
                    or _fast_c_store_rq(self, primitive, context_id)):
                original_send(self, primitive, context_id)

        _dimse_messages.create_file_meta = create_file_meta
        _dimse_messages.write_file_meta_info = write_file_meta_info
        _dimse.DIMSEServiceProvider.send_msg = send_msg
        _association.split_dataset = split_dataset
        _installed = True
        return True
