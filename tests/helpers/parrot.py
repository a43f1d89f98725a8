"""A scripted raw-socket DICOM peer for malformed PDUs and abrupt disconnects.

It speaks just enough of PS3.8 to open an association and then misbehave on purpose.
"""

from __future__ import annotations

import io
import socket
import struct
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pynetdicom.dimse_messages import C_ECHO_RQ
from pynetdicom.dimse_primitives import C_ECHO
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context

from tests.helpers.net import LOOPBACK

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"


def associate_rq(calling: str, called: str, abstract: str = CT_IMAGE_STORAGE,
                 syntax: str = EXPLICIT_VR_LITTLE_ENDIAN, max_length: int = 16384) -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing one context (ID 1); *max_length*: the largest
    PDU the parrot accepts."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    context = build_context(abstract, [syntax])
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    max_pdu = MaximumLengthNotification()
    max_pdu.maximum_length_received = max_length
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.826.0.1.3680043.8.498.1"
    primitive.user_information = [max_pdu, implementation]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def p_data(context_id: int, control: int, payload: bytes) -> bytes:
    """A P-DATA-TF PDU with one PDV (control: bit 0 command, bit 1 last fragment)."""
    return p_data_items((context_id, control, payload))


def p_data_items(*items: tuple[int, int, bytes]) -> bytes:
    """A P-DATA-TF PDU with a PDV for each (context ID, control, payload)."""
    body = b"".join(struct.pack(">LBB", len(payload) + 2, context_id, control) + payload
                    for context_id, control, payload in items)
    return struct.pack(">BBL", 0x04, 0, len(body)) + body


def c_store_command(sop_class: str, sop_instance: str, message_id: int = 1) -> bytes:
    """An encoded C-STORE-RQ command set (implicit VR little endian with group length)."""
    command = Dataset()
    command.AffectedSOPClassUID = sop_class
    command.CommandField = 0x0001
    command.MessageID = message_id
    command.Priority = 0
    command.CommandDataSetType = 0x0000
    command.AffectedSOPInstanceUID = sop_instance
    body = encode(command, True, True)
    group_length = struct.pack("<HHLL", 0x0000, 0x0000, 4, len(body))
    return group_length + bytes(body)


def c_echo_command(message_id: int = 1) -> bytes:
    """An encoded C-ECHO-RQ command set, as pynetdicom encodes it."""
    primitive = C_ECHO()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = "1.2.840.10008.1.1"
    message = C_ECHO_RQ()
    message.primitive_to_message(primitive)
    return bytes(encode(message.command_set, True, True))


@dataclass
class Parrot:
    """A connected raw peer."""

    sock: socket.socket

    @classmethod
    def connect(cls, port: int, timeout: float = 10.0) -> Parrot:
        sock = socket.create_connection((LOOPBACK, port), timeout=timeout)
        return cls(sock)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def receive_pdu(self) -> tuple[int, bytes] | None:
        """The next PDU (type, body), or None when the peer closed the connection.

        A timeout fails the test: the node must always answer.
        """
        header = self._read(6)
        if header is None:
            return None
        pdu_type, _, length = struct.unpack(">BBL", header)
        body = self._read(length)
        return (pdu_type, body or b"")

    def _read(self, count: int) -> bytes | None:
        data = b""
        while len(data) < count:
            try:
                chunk = self.sock.recv(count - len(data))
            except ConnectionResetError:
                return None
            except TimeoutError:
                raise AssertionError("the node did not answer within the timeout") from None
            if not chunk:
                return None
            data += chunk
        return data

    def receive_command(self) -> Dataset:
        """The next DIMSE command set from the node, its fragments joined."""
        encoded = b""
        while True:
            pdu = self.receive_pdu()
            assert pdu is not None and pdu[0] == 0x04, f"expected P-DATA-TF, got {pdu!r}"
            body, position = pdu[1], 0
            while position < len(body):
                length, _, control = struct.unpack_from(">LBB", body, position)
                encoded += body[position + 6:position + 4 + length]
                position += 4 + length
                if control == 0b11:
                    return decode(io.BytesIO(encoded), True, True)

    def answered_with_abort(self) -> bool:
        """True when the next thing from the node is an A-ABORT PDU or a closed connection."""
        pdu = self.receive_pdu()
        return pdu is None or pdu[0] == 0x07

    def reset(self) -> None:
        """Drop the connection abruptly (RST)."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        self.sock.close()
