"""HL7 v2 messages: reading orders and patient updates, writing ACKs and study messages.

Pure: text in, data out (and the reverse). Parsing uses hl7apy; what a message means
for the gateway (which fields hold the accession number, the patient, the merge) is
decided here, with the field choices documented next to each.
"""

from __future__ import annotations

import datetime as dt
import itertools
from dataclasses import dataclass
from typing import Any

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.exceptions import HL7apyException
from hl7apy.parser import parse_message

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"
SUPPORTED_VERSIONS = frozenset({"2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1",
                                "2.8", "2.8.1", "2.8.2"})
ORDER_TYPES = frozenset({"ORM^O01", "OMI^O23"})
PATIENT_UPDATE = "ADT^A08"
PATIENT_MERGE = "ADT^A40"
_control_ids = itertools.count(1)


class Hl7MessageError(Exception):
    """The message cannot be processed; ``code`` is the ACK code to answer with."""

    def __init__(self, code: str, error_code: str, text: str) -> None:
        super().__init__(text)
        self.code = code  # AE (error) or AR (reject)
        self.error_code = error_code  # HL7 table 0357
        self.text = text


@dataclass(frozen=True, slots=True)
class Inbound:
    """An inbound message, parsed enough to route and acknowledge it."""

    message_type: str
    control_id: str
    version: str
    sending_application: str
    sending_facility: str
    segments: dict[str, list[Any]]

    def first(self, name: str) -> Any | None:
        found = self.segments.get(name)
        return found[0] if found else None


def frame(text: str) -> bytes:
    """MLLP framing: <VT> message <FS><CR>."""
    return START_BLOCK + text.encode("utf-8") + END_BLOCK


def _value(element: Any) -> str:
    try:
        return str(element.to_er7()).strip()
    except (AttributeError, HL7apyException, IndexError):
        return ""


def _field(segment: Any, name: str) -> str:
    if segment is None:
        return ""
    try:
        return _value(getattr(segment, name))
    except (AttributeError, HL7apyException, IndexError, KeyError):
        return ""


def _component(value: str, index: int) -> str:
    parts = value.split("~", 1)[0].split("^")
    return parts[index].strip() if index < len(parts) else ""


def parse(text: str) -> Inbound:
    """Parse an ER7 message; raise :class:`Hl7MessageError` with the ACK code if it cannot
    be understood."""
    text = text.replace("\r\n", "\r").replace("\n", "\r").strip("\r")
    if not text.startswith("MSH"):
        raise Hl7MessageError("AR", "100", "the message does not start with an MSH segment")
    header = text.split("\r", 1)[0]
    fields = header.split(header[3]) if len(header) > 3 else []
    version = fields[11].split(header[4])[0] if len(fields) > 11 and len(header) > 4 else ""
    if version and version not in SUPPORTED_VERSIONS:
        raise Hl7MessageError("AR", "203", f"HL7 version {version[:20]} is not supported")
    try:
        message = parse_message(
            text, find_groups=False, validation_level=VALIDATION_LEVEL.TOLERANT
        )
    except HL7apyException as exc:
        raise Hl7MessageError("AR", "102", f"unreadable message ({type(exc).__name__})") from exc
    except Exception as exc:
        raise Hl7MessageError("AR", "102", f"unreadable message ({type(exc).__name__})") from exc
    msh = message.msh
    type_field = _field(msh, "msh_9")
    message_type = "^".join(type_field.split("^")[:2]) if type_field else ""
    segments: dict[str, list[Any]] = {}
    for segment in message.children:
        segments.setdefault(str(segment.name), []).append(segment)
    return Inbound(
        message_type=message_type,
        control_id=_field(msh, "msh_10"),
        version=_component(_field(msh, "msh_12"), 0),
        sending_application=_component(_field(msh, "msh_3"), 0),
        sending_facility=_component(_field(msh, "msh_4"), 0),
        segments=segments,
    )


@dataclass(frozen=True, slots=True)
class PatientInfo:
    patient_id: str
    issuer: str = ""
    name: str = ""
    birth_date: str = ""
    sex: str = ""


def _patient(pid: Any) -> PatientInfo:
    """PID-3 (first identifier, CX.1 and CX.4 assigning authority), PID-5, PID-7, PID-8."""
    identifier = _field(pid, "pid_3")
    name = _field(pid, "pid_5").split("~", 1)[0]
    return PatientInfo(
        patient_id=_component(identifier, 0),
        issuer=_component(identifier, 3).split("&", 1)[0],
        name="^".join(part for part in name.split("^")[:5]).rstrip("^"),
        birth_date=_field(pid, "pid_7")[:8],
        sex=_field(pid, "pid_8")[:1],
    )


@dataclass(frozen=True, slots=True)
class OrderInfo:
    order_key: str
    accession_number: str
    placer_order_number: str
    filler_order_number: str
    requested_procedure_id: str
    study_instance_uid: str
    procedure_code: str
    procedure_text: str
    modality: str
    scheduled_station_ae: str
    order_control: str
    order_status: str
    patient: PatientInfo


def order_from(message: Inbound) -> OrderInfo:
    """An imaging order from ORM^O01 or OMI^O23.

    Accession number: IPC-1 (OMI), else OBR-18 (placer field 1, the usual radiology
    place), else the filler order number (OBR-3, ORC-3). Modality: IPC-5, else OBR-24.
    Scheduled station AE title: IPC-9. Order control and status: ORC-1 and ORC-5.
    """
    pid, orc, obr, ipc = (message.first(n) for n in ("PID", "ORC", "OBR", "IPC"))
    if pid is None:
        raise Hl7MessageError("AE", "100", "the order has no PID segment")
    if orc is None and obr is None:
        raise Hl7MessageError("AE", "100", "the order has neither ORC nor OBR")
    placer = _component(_field(obr, "obr_2") or _field(orc, "orc_2"), 0)
    filler = _component(_field(obr, "obr_3") or _field(orc, "orc_3"), 0)
    accession = (
        _component(_field(ipc, "ipc_1"), 0) or _component(_field(obr, "obr_18"), 0) or filler
    )
    patient = _patient(pid)
    if not patient.patient_id:
        raise Hl7MessageError("AE", "101", "PID-3 (patient identifier) is empty")
    key = placer or accession
    if not key:
        raise Hl7MessageError("AE", "101", "the order has no placer order or accession number")
    service = _field(obr, "obr_4")
    return OrderInfo(
        order_key=key,
        accession_number=accession,
        placer_order_number=placer,
        filler_order_number=filler,
        requested_procedure_id=_component(_field(ipc, "ipc_2"), 0),
        study_instance_uid=_component(_field(ipc, "ipc_3"), 0),
        procedure_code=_component(service, 0),
        procedure_text=_component(service, 1),
        modality=_component(_field(ipc, "ipc_5"), 0) or _component(_field(obr, "obr_24"), 0),
        scheduled_station_ae=_component(_field(ipc, "ipc_9"), 0),
        order_control=_component(_field(orc, "orc_1"), 0),
        order_status=_component(_field(orc, "orc_5"), 0),
        patient=patient,
    )


def patient_update_from(message: Inbound) -> PatientInfo:
    """ADT^A08: the patient's current demographics (PID)."""
    pid = message.first("PID")
    if pid is None:
        raise Hl7MessageError("AE", "100", "the message has no PID segment")
    patient = _patient(pid)
    if not patient.patient_id:
        raise Hl7MessageError("AE", "101", "PID-3 (patient identifier) is empty")
    return patient


def merge_from(message: Inbound) -> tuple[PatientInfo, PatientInfo]:
    """ADT^A40: (surviving patient from PID, prior patient from MRG-1)."""
    surviving = patient_update_from(message)
    mrg = message.first("MRG")
    prior_identifier = _field(mrg, "mrg_1")
    prior = PatientInfo(_component(prior_identifier, 0), _component(prior_identifier, 3))
    if not prior.patient_id:
        raise Hl7MessageError("AE", "101", "MRG-1 (prior patient identifier) is empty")
    return surviving, prior


def escape(text: str) -> str:
    """Escape HL7 delimiters in free text (``\\F\\`` etc.)."""
    replacements = {"\\": "\\E\\", "|": "\\F\\", "^": "\\S\\", "~": "\\R\\", "&": "\\T\\"}
    return "".join(replacements.get(char, char) for char in text)


def _timestamp(now: dt.datetime | None = None) -> str:
    return (now or dt.datetime.now(dt.UTC)).strftime("%Y%m%d%H%M%S")


def new_control_id(prefix: str = "GW") -> str:
    return f"{prefix}{dt.datetime.now(dt.UTC).strftime('%Y%m%d%H%M%S')}{next(_control_ids):06d}"


def _msh(
    app: str, facility: str, to_app: str, to_facility: str, message_type: str, *,
    control_id: str, version: str,
) -> str:
    fields = ["MSH", "^~\\&", escape(app), escape(facility), escape(to_app), escape(to_facility),
              _timestamp(), "", message_type, control_id, "P", version]
    return "|".join(fields)


def ack(
    inbound: Inbound | None, code: str, text: str, *, application: str, facility: str,
    error_code: str | None = None,
) -> str:
    """An ACK (MSA-1 AA, AE or AR) for *inbound* (or for a message we could not read)."""
    version = inbound.version if inbound and inbound.version in SUPPORTED_VERSIONS else "2.5"
    trigger = inbound.message_type.split("^")[1] if inbound and "^" in inbound.message_type else ""
    lines = [
        _msh(application, facility, inbound.sending_application if inbound else "",
             inbound.sending_facility if inbound else "",
             f"ACK^{trigger}^ACK" if trigger else "ACK", control_id=new_control_id("ACK"),
             version=version),
        "|".join(["MSA", code, escape(inbound.control_id if inbound else ""), escape(text[:80])]),
    ]
    if code != "AA":
        lines.append("|".join(["ERR", "", "", f"{error_code or '207'}^^HL70357", "E", "", "", "",
                               escape(text[:250])]))
    return "\r".join(lines)


def ack_code(text: str) -> str | None:
    """MSA-1 of an ACK, or None when it is not one."""
    for segment in text.replace("\n", "\r").split("\r"):
        if segment.startswith("MSA"):
            fields = segment.split(segment[3] if len(segment) > 3 else "|")
            return fields[1].strip() if len(fields) > 1 else None
    return None


@dataclass(frozen=True, slots=True)
class StudyMessageFacts:
    """What a "study available" message says."""

    study_instance_uid: str
    accession_number: str
    patient: PatientInfo
    placer_order_number: str
    filler_order_number: str
    procedure_code: str
    procedure_text: str
    study_datetime: str
    number_of_instances: int
    modalities: str
    endpoint_url: str | None = None


def _segment(name: str, fields: list[str]) -> str:
    return "|".join([name, *fields]).rstrip("|")


def study_available(
    kind: str, facts: StudyMessageFacts, *, application: str, facility: str, to_app: str,
    to_facility: str, version: str, control_id: str,
) -> str:
    """ORU^R01 (result: the study is available) or ORM^O01 (order status change: done)."""
    patient = facts.patient
    pid = _segment("PID", ["1", "", f"{escape(patient.patient_id)}^^^{escape(patient.issuer)}",
                           "", patient.name.replace("|", ""), "", patient.birth_date,
                           patient.sex])
    service = f"{escape(facts.procedure_code)}^{escape(facts.procedure_text)}"
    placer, filler = escape(facts.placer_order_number), escape(facts.filler_order_number)
    accession = escape(facts.accession_number)
    if kind == "ORM^O01":
        orc = _segment("ORC", ["SC", placer, filler, "", "CM"])
        obr = _segment("OBR", ["1", placer, filler, service, "", "", facts.study_datetime,
                               *[""] * 10, accession, *[""] * 5, escape(facts.modalities),
                               "F"])
        body = [orc, obr]
    else:
        orc = _segment("ORC", ["RE", placer, filler, "", "CM"])
        obr = _segment("OBR", ["1", placer, filler, service, "", "", facts.study_datetime,
                               *[""] * 10, accession, *[""] * 5, escape(facts.modalities),
                               "F"])
        observations = [
            _segment("OBX", ["1", "ST", "113014^DICOM Study^DCM", "",
                             escape(facts.study_instance_uid), "", "", "", "", "", "F"]),
            _segment("OBX", ["2", "NM", "INSTANCES^Number of instances^99DICOMGW", "",
                             str(facts.number_of_instances), "", "", "", "", "", "F"]),
        ]
        if facts.endpoint_url:
            observations.append(_segment("OBX", [
                "3", "RP", "DICOMWEB^Study location^99DICOMGW", "",
                f"{escape(facts.endpoint_url)}^^APPLICATION^DICOM", "", "", "", "", "", "F"]))
        body = [orc, obr, *observations]
    message_type = "ORM^O01^ORM_O01" if kind == "ORM^O01" else "ORU^R01^ORU_R01"
    msh = _msh(application, facility, to_app, to_facility, message_type,
               control_id=control_id, version=version)
    text = "\r".join([msh, pid, *body])
    parse(text)  # what we send must be what we would accept
    return text

