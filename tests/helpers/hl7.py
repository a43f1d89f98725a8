"""HL7 v2 test peers: hl7apy-built messages, an MLLP client and an MLLP receiver."""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message

from gateway.hl7.listener import read_frame
from gateway.hl7.messages import frame
from tests.helpers.net import LOOPBACK, free_port

_counter = iter(range(1, 10**9))


def _message(structure: str, message_type: str, version: str = "2.5") -> Any:
    message = Message(structure, version=version, validation_level=VALIDATION_LEVEL.TOLERANT)
    message.msh.msh_3 = "RIS"
    message.msh.msh_4 = "HOSPITAL"
    message.msh.msh_5 = "DICOMGW"
    message.msh.msh_9 = message_type
    message.msh.msh_10 = f"MSG{next(_counter):06d}"
    message.msh.msh_11 = "P"
    return message


def _pid(message: Any, patient_id: str, name: str, birth_date: str, sex: str, *,
         issuer: str = "HOSP") -> None:
    pid = message.add_segment("PID")
    pid.pid_3 = f"{patient_id}^^^{issuer}^MR"
    pid.pid_5 = name
    pid.pid_7 = birth_date
    pid.pid_8 = sex


def orm_o01(accession: str, patient_id: str = "PAT1", name: str = "Doe^Jane", *,
            birth_date: str = "19700131", sex: str = "F", placer: str | None = None,
            control: str = "NW", modality: str = "CT") -> str:
    message = _message("ORM_O01", "ORM^O01^ORM_O01")
    _pid(message, patient_id, name, birth_date, sex)
    orc = message.add_segment("ORC")
    orc.orc_1 = control
    orc.orc_2 = placer or f"PL{accession}"
    orc.orc_5 = "SC"
    obr = message.add_segment("OBR")
    obr.obr_2 = placer or f"PL{accession}"
    obr.obr_4 = "CTHEAD^CT Head without contrast"
    obr.obr_18 = accession
    obr.obr_24 = modality
    return str(message.to_er7())


def omi_o23(accession: str, patient_id: str = "PAT1", name: str = "Doe^Jane",
            station_ae: str = "CT01") -> str:
    message = _message("OMI_O23", "OMI^O23^OMI_O23")
    _pid(message, patient_id, name, "19700131", "F")
    orc = message.add_segment("ORC")
    orc.orc_1 = "NW"
    orc.orc_2 = f"PL{accession}"
    obr = message.add_segment("OBR")
    obr.obr_2 = f"PL{accession}"
    obr.obr_4 = "MRBRAIN^MR Brain"
    ipc = message.add_segment("IPC")
    ipc.ipc_1 = accession
    ipc.ipc_2 = "RP1"
    ipc.ipc_3 = "1.2.826.0.1.3680043.8.498.1"
    ipc.ipc_4 = "SPS1"
    ipc.ipc_5 = "MR"
    ipc.ipc_9 = station_ae
    return str(message.to_er7())


def adt_a08(patient_id: str, name: str, birth_date: str = "19700131", sex: str = "F") -> str:
    message = _message("ADT_A01", "ADT^A08^ADT_A01")  # A08 uses the A01 structure
    message.add_segment("EVN").evn_1 = "A08"
    _pid(message, patient_id, name, birth_date, sex)
    return str(message.to_er7())


def adt_a40(surviving_id: str, prior_id: str, name: str = "Doe^Jane") -> str:
    message = _message("ADT_A39", "ADT^A40^ADT_A39")
    message.add_segment("EVN").evn_1 = "A40"
    _pid(message, surviving_id, name, "19700131", "F")
    mrg = message.add_segment("MRG")
    mrg.mrg_1 = f"{prior_id}^^^HOSP^MR"
    return str(message.to_er7())


def adt_a01(patient_id: str) -> str:
    message = _message("ADT_A01", "ADT^A01^ADT_A01")
    message.add_segment("EVN").evn_1 = "A01"
    _pid(message, patient_id, "Doe^Jane", "19700131", "F")
    return str(message.to_er7())


def send(port: int, *texts: str, timeout: float = 10.0) -> list[str]:
    """Send messages over one MLLP connection; return the ACKs (text)."""
    replies = []
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
        buffer = bytearray()
        for text in texts:
            sock.sendall(frame(text))
            reply = read_frame(sock, buffer, 10**7)
            assert reply is not None, "the listener closed the connection instead of ACKing"
            replies.append(reply.decode("utf-8"))
    return replies


def segment(text: str, name: str) -> list[str]:
    """The fields of the first segment called *name* (index 0 is the segment name)."""
    for line in text.split("\r"):
        if line.startswith(name):
            return line.split("|")
    raise AssertionError(f"no {name} segment in {text!r}")


@dataclass
class MllpReceiver:
    """An HL7 receiver answering with the ACK code of ``answer`` (AA, AE, AR), or
    reading messages and never answering when ``answer`` is None."""

    port: int
    answer: str | None = "AA"
    received: list[str] = field(default_factory=list)
    server: Any = None


@contextmanager
def mllp_receiver(answer: str | None = "AA") -> Iterator[MllpReceiver]:
    receiver = MllpReceiver(free_port(), answer)

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            buffer = bytearray()
            while True:
                content = read_frame(self.request, buffer, 10**7)
                if content is None:
                    return
                text = content.decode("utf-8")
                receiver.received.append(text)
                if receiver.answer is None:
                    continue  # keep the connection open, say nothing
                control = segment(text, "MSH")[9]
                msh = f"MSH|^~\\&|RIS|H|GW|H|20240101||ACK|A{control}|P|2.5"
                ack = f"{msh}\rMSA|{receiver.answer}|{control}"
                self.request.sendall(frame(ack))

    server = socketserver.ThreadingTCPServer((LOOPBACK, receiver.port), Handler)
    server.daemon_threads = True
    receiver.server = server
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
