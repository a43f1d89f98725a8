"""The attributes the index keeps for each instance, taken from its header.

Pure: a :class:`~gateway.dicom.header.Header` in, an :class:`InstanceAttributes` out,
or an :class:`InvalidInstanceError` saying why the instance cannot be indexed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from pydicom.datadict import tag_for_keyword

from gateway.dicom.header import Header

# UIDs become object-store keys and file names, so anything that is not UID-like
# (digits and dots; letters and dashes are tolerated from non-conformant senders)
# is refused rather than escaped.
_UID_PATTERN: Final = re.compile(r"^(?=.*[0-9])[0-9A-Za-z._-]{1,64}$")

INDEXED_KEYWORDS: Final = (
    "SpecificCharacterSet",
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "Modality",
    "ReferringPhysicianName",
    "StudyDescription",
    "SeriesDescription",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "BodyPartExamined",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "StudyID",
    "SeriesNumber",
    "InstanceNumber",
    "NumberOfFrames",
    # Documents (encapsulated PDF/CDA, structured reports), for FHIR DocumentReference:
    "ContentDate",
    "ContentTime",
    "ConceptNameCodeSequence",
    "DocumentTitle",
    "MIMETypeOfEncapsulatedDocument",
)

ENCAPSULATED_DOCUMENTS: Final = frozenset(
    {"1.2.840.10008.5.1.4.1.1.104.1", "1.2.840.10008.5.1.4.1.1.104.2"}  # PDF, CDA
)
_SR_PREFIX: Final = "1.2.840.10008.5.1.4.1.1.88."
_KEY_OBJECT_SELECTION: Final = "1.2.840.10008.5.1.4.1.1.88.59"


def is_document(sop_class_uid: str) -> bool:
    """Encapsulated PDF/CDA and structured reports (but not key object selections)."""
    if sop_class_uid in ENCAPSULATED_DOCUMENTS:
        return True
    return sop_class_uid.startswith(_SR_PREFIX) and sop_class_uid != _KEY_OBJECT_SELECTION


def _tag(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    return tag


INDEXED_TAGS: Final = frozenset(_tag(keyword) for keyword in INDEXED_KEYWORDS)
_T = {keyword: _tag(keyword) for keyword in INDEXED_KEYWORDS}


class InvalidInstanceError(ValueError):
    """The instance cannot be indexed; the message says why (sent as Error Comment)."""


@dataclass(frozen=True, slots=True)
class InstanceAttributes:
    """Identifiers and searchable attributes of one instance."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str = ""
    issuer_of_patient_id: str = ""
    patient_name: str | None = None
    patient_birth_date: str | None = None
    patient_sex: str | None = None
    study_date: str | None = None
    study_time: str | None = None
    accession_number: str | None = None
    study_description: str | None = None
    study_id: str | None = None
    referring_physician_name: str | None = None
    modality: str | None = None
    series_number: int | None = None
    series_description: str | None = None
    body_part_examined: str | None = None
    instance_number: int | None = None
    number_of_frames: int | None = None
    document_title: str | None = None
    document_mime_type: str | None = None
    content_date: str | None = None
    content_time: str | None = None


def _integer(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        number = int(float(text))
    except (ValueError, OverflowError):
        return None
    # Out-of-range values from malformed headers must not make the index refuse the row.
    return number if -(2**31) <= number < 2**31 else None


def _required_uid(header: Header, keyword: str) -> str:
    value = header.first(_T[keyword])
    if value is None:
        raise InvalidInstanceError(f"{keyword} is missing")
    if not is_safe_uid(value):
        raise InvalidInstanceError(f"{keyword} {value[:80]!r} is not a valid UID")
    return value


def is_safe_uid(value: str) -> bool:
    """True when *value* looks like a UID and is safe to use in keys and paths."""
    return bool(_UID_PATTERN.match(value))


def _document_title(header: Header, sop_class_uid: str) -> str | None:
    title = header.first(_T["DocumentTitle"])
    if title or not sop_class_uid.startswith(_SR_PREFIX):
        return title
    # A structured report's title is the meaning of its root concept name.
    if _T["ConceptNameCodeSequence"] not in header:
        return None
    try:
        sequence = header.dataset().ConceptNameCodeSequence
        meaning = sequence[0].get("CodeMeaning") if sequence else None
    except Exception:  # noqa: BLE001 - a malformed optional sequence only loses the title
        return None
    text = str(meaning or "").replace("\x00", "").strip()
    return text or None


def extract_attributes(header: Header) -> InstanceAttributes:
    """Take the indexed attributes from *header*; raise if it cannot be indexed."""
    first = header.first
    sop_class_uid = _required_uid(header, "SOPClassUID")
    document = is_document(sop_class_uid)
    return InstanceAttributes(
        sop_class_uid=sop_class_uid,
        sop_instance_uid=_required_uid(header, "SOPInstanceUID"),
        study_instance_uid=_required_uid(header, "StudyInstanceUID"),
        series_instance_uid=_required_uid(header, "SeriesInstanceUID"),
        patient_id=first(_T["PatientID"]) or "",
        issuer_of_patient_id=first(_T["IssuerOfPatientID"]) or "",
        patient_name=first(_T["PatientName"]),
        patient_birth_date=first(_T["PatientBirthDate"]),
        patient_sex=first(_T["PatientSex"]),
        study_date=first(_T["StudyDate"]),
        study_time=first(_T["StudyTime"]),
        accession_number=first(_T["AccessionNumber"]),
        study_description=first(_T["StudyDescription"]),
        study_id=first(_T["StudyID"]),
        referring_physician_name=first(_T["ReferringPhysicianName"]),
        modality=first(_T["Modality"]),
        series_number=_integer(first(_T["SeriesNumber"])),
        series_description=first(_T["SeriesDescription"]),
        body_part_examined=first(_T["BodyPartExamined"]),
        instance_number=_integer(first(_T["InstanceNumber"])),
        number_of_frames=_integer(first(_T["NumberOfFrames"])),
        document_title=_document_title(header, sop_class_uid) if document else None,
        document_mime_type=first(_T["MIMETypeOfEncapsulatedDocument"]) if document else None,
        content_date=first(_T["ContentDate"]) if document else None,
        content_time=first(_T["ContentTime"]) if document else None,
    )
