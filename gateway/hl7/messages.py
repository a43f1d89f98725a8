"""HL7 v2 messages: reading orders and patient updates, writing ACKs and study messages.

Pure: text in, data out (and the reverse). Parsing uses hl7apy; what a message means
for the gateway (which fields hold the accession number, the patient, the merge) is
decided here, with the field choices documented next to each.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any

from hl7apy import SUPPORTED_LIBRARIES
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.exceptions import HL7apyException
from hl7apy.parser import parse_message

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"
SUPPORTED_VERSIONS = frozenset(SUPPORTED_LIBRARIES)
"""The HL7 versions hl7apy can read (and the gateway can write)."""
ENCODING_CHARACTERS = ("^~\\&", "^~\\&#")
ORDER_TYPES = frozenset({"ORM^O01", "OMI^O23"})
PATIENT_UPDATE = "ADT^A08"
PATIENT_MERGE = "ADT^A40"


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
    processing_id: str = "P"

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


@dataclass(frozen=True, slots=True)
class Header:
    """What MSH says, read without a parser (to answer even unparseable messages)."""

    message_type: str = ""
    control_id: str = ""
    processing_id: str = "P"
    version: str = ""
    sending_application: str = ""
    sending_facility: str = ""


def read_header(text: str) -> Header:
    first = text.split("\r", 1)[0]
    if len(first) < 8 or not first.startswith("MSH"):
        return Header()
    separator, component = first[3], first[4]
    fields = first.split(separator)

    def field(index: int) -> str:
        return fields[index] if len(fields) > index else ""

    def first_component(index: int) -> str:
        return field(index).split(component)[0].strip()

    return Header(
        message_type="^".join(field(8).split(component)[:2]),
        control_id=field(9).strip()[:50],
        processing_id=first_component(10) or "P",
        version=first_component(11),
        sending_application=first_component(2),
        sending_facility=first_component(3),
    )


def parse(text: str) -> Inbound:
    """Parse an ER7 message; raise :class:`Hl7MessageError` with the ACK code if it cannot
    be understood."""
    text = text.replace("\r\n", "\r").replace("\n", "\r").strip("\r")
    if not text.startswith("MSH"):
        raise Hl7MessageError("AR", "100", "the message does not start with an MSH segment")
    header = read_header(text)
    if len(text) < 8 or text[3] != "|" or text[4:].split("|", 1)[0] not in ENCODING_CHARACTERS:
        raise Hl7MessageError("AR", "102", "MSH-1/MSH-2 must be | and ^~\\&")
    if header.version and header.version not in SUPPORTED_VERSIONS:
        raise Hl7MessageError("AR", "203", f"HL7 version {header.version[:20]} is not supported")
    try:
        message = parse_message(
            text, find_groups=False, validation_level=VALIDATION_LEVEL.TOLERANT
        )
    except Exception as exc:  # hl7apy raises many kinds; none may escape
        raise Hl7MessageError("AR", "102", f"unreadable message ({type(exc).__name__})") from exc
    segments: dict[str, list[Any]] = {}
    for segment in message.children:
        segments.setdefault(str(segment.name), []).append(segment)
    return Inbound(
        message_type=header.message_type,
        control_id=header.control_id,
        version=header.version,
        sending_application=header.sending_application,
        sending_facility=header.sending_facility,
        segments=segments,
        processing_id=header.processing_id,
    )


@dataclass(frozen=True, slots=True)
class PatientInfo:
    patient_id: str
    issuer: str = ""
    name: str = ""
    birth_date: str = ""
    sex: str = ""


def unescape(text: str) -> str:
    """Undo HL7 escapes of the delimiters (``\\F\\`` etc.)."""
    for escaped, char in (("\\F\\", "|"), ("\\S\\", "^"), ("\\R\\", "~"),
                          ("\\T\\", "&"), ("\\E\\", "\\")):
        text = text.replace(escaped, char)
    return text


def xpn_to_dicom(xpn: str) -> str:
    """HL7 XPN (family^given^middle^suffix^prefix) to a DICOM PN (family^given^middle^
    prefix^suffix); only the first repetition and the first subcomponent of each part."""
    parts = [unescape(p.split("&", 1)[0]).strip() for p in xpn.split("~", 1)[0].split("^")]
    parts += [""] * (5 - len(parts))
    family, given, middle, suffix, prefix = parts[:5]
    return "^".join([family, given, middle, prefix, suffix]).rstrip("^")


def dicom_to_xpn(name: str) -> str:
    """A DICOM PN (alphabetic group) as an escaped HL7 XPN."""
    parts = name.split("=", 1)[0].split("^")
    parts += [""] * (5 - len(parts))
    family, given, middle, prefix, suffix = parts[:5]
    return "^".join(escape(p.strip()) for p in (family, given, middle, suffix, prefix)).rstrip("^")


def _identifier(cx: str) -> tuple[str, str]:
    """(ID, assigning authority) of the first repetition of a CX field (CX.1, CX.4.1)."""
    return unescape(_component(cx, 0)), unescape(_component(cx, 3).split("&", 1)[0])


def _patient(pid: Any) -> PatientInfo:
    """PID-3 (first identifier, CX.1 and CX.4 assigning authority), PID-5, PID-7, PID-8."""
    patient_id, issuer = _identifier(_field(pid, "pid_3"))
    return PatientInfo(
        patient_id=patient_id,
        issuer=issuer,
        name=xpn_to_dicom(_field(pid, "pid_5")),
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
    prior_id, prior_issuer = _identifier(_field(message.first("MRG"), "mrg_1"))
    prior = PatientInfo(prior_id, prior_issuer)
    if not prior.patient_id:
        raise Hl7MessageError("AE", "101", "MRG-1 (prior patient identifier) is empty")
    return surviving, prior


def escape(text: str) -> str:
    """Escape HL7 delimiters in free text (``\\F\\`` etc.)."""
    replacements = {"\\": "\\E\\", "|": "\\F\\", "^": "\\S\\", "~": "\\R\\", "&": "\\T\\"}
    return "".join(replacements.get(char, char) for char in text)


def _timestamp() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%d%H%M%S")


def new_control_id(prefix: str = "GW") -> str:
    """Unique across nodes and restarts, and within MSH-10's 20 characters."""
    return f"{prefix}{uuid.uuid4().hex[:16].upper()}"


def _msh(
    app: str, facility: str, to_app: str, to_facility: str, message_type: str, *,
    control_id: str, version: str, processing_id: str = "P",
) -> str:
    fields = ["MSH", "^~\\&", escape(app), escape(facility), escape(to_app), escape(to_facility),
              _timestamp(), "", message_type, control_id, escape(processing_id), version]
    return "|".join(fields)


def ack(
    inbound: Inbound | Header | None, code: str, text: str, *, application: str, facility: str,
    error_code: str | None = None,
) -> str:
    """An ACK (MSA-1 AA, AE or AR) for a message; *inbound* is its parsed form, or just
    its header when it could not be parsed (so MSA-2 still echoes its control id)."""
    source = inbound or Header()
    version = source.version if source.version in SUPPORTED_VERSIONS else "2.5"
    trigger = source.message_type.split("^")[1] if "^" in source.message_type else ""
    msh = _msh(
        application, facility, source.sending_application, source.sending_facility,
        f"ACK^{trigger}^ACK" if trigger else "ACK", control_id=new_control_id("ACK"),
        version=version, processing_id=getattr(source, "processing_id", "P"),
    )
    # The control id is echoed as it came (it is already in ER7 form).
    lines = [msh, "|".join(["MSA", code, source.control_id, escape(text[:80])])]
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
                           "", dicom_to_xpn(patient.name), "", escape(patient.birth_date),
                           escape(patient.sex)])
    service = f"{escape(facts.procedure_code)}^{escape(facts.procedure_text)}"
    placer, filler = escape(facts.placer_order_number), escape(facts.filler_order_number)
    obr = _segment("OBR", ["1", placer, filler, service, "", "", escape(facts.study_datetime),
                           *[""] * 10, escape(facts.accession_number), *[""] * 5,
                           escape(facts.modalities), "F"])
    if kind == "ORM^O01":
        body = [_segment("ORC", ["SC", placer, filler, "", "CM"]), obr]
    else:
        orc = _segment("ORC", ["RE", placer, filler, "", "CM"])
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

