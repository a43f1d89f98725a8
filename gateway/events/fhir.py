"""DICOM study → FHIR ImagingStudy and DocumentReference (R4 as R4B, and R5).

Pure: study summaries built from the index in, validated FHIR JSON out. Follows the
FHIR DICOM mapping: the study is identified as ``urn:dicom:uid`` / ``urn:oid:<UID>``,
modalities and SOP classes are coded, and the patient is referred to by identifier (no
Patient resource is invented).
"""

from __future__ import annotations

import base64
import datetime as dt
import re
from dataclasses import dataclass
from typing import Any, Literal

from fhir.resources.documentreference import DocumentReference as DocumentReferenceR5
from fhir.resources.imagingstudy import ImagingStudy as ImagingStudyR5
from fhir.resources.R4B.documentreference import DocumentReference as DocumentReferenceR4
from fhir.resources.R4B.imagingstudy import ImagingStudy as ImagingStudyR4

DICOM_UID_SYSTEM = "urn:dicom:uid"
DCM_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"
URI_SYSTEM = "urn:ietf:rfc:3986"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
CONNECTION_TYPES = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
_OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")

FhirVersion = Literal["R4", "R5"]


@dataclass(frozen=True, slots=True)
class PatientSummary:
    patient_id: str
    issuer_of_patient_id: str = ""


@dataclass(frozen=True, slots=True)
class InstanceSummary:
    sop_instance_uid: str
    sop_class_uid: str
    instance_number: int | None = None
    document_title: str | None = None
    content_date: str | None = None
    content_time: str | None = None
    size: int = 0
    sha1: str | None = None
    object_key: str | None = None
    received_at: dt.datetime | None = None


@dataclass(frozen=True, slots=True)
class SeriesSummary:
    series_instance_uid: str
    modality: str | None
    series_number: int | None
    series_description: str | None
    body_part_examined: str | None
    instances: tuple[InstanceSummary, ...]


@dataclass(frozen=True, slots=True)
class OrderSummary:
    accession_number: str | None
    placer_order_number: str | None = None
    filler_order_number: str | None = None


@dataclass(frozen=True, slots=True)
class StudySummary:
    study_instance_uid: str
    patient: PatientSummary
    series: tuple[SeriesSummary, ...]
    accession_number: str | None = None
    study_date: str | None = None
    study_time: str | None = None
    study_description: str | None = None
    referring_physician_name: str | None = None
    order: OrderSummary | None = None


@dataclass(frozen=True, slots=True)
class FhirOptions:
    version: FhirVersion = "R4"
    endpoint_url: str | None = None
    attachment_base_url: str | None = None
    patient_identifier_system: str | None = None
    accession_identifier_system: str | None = None
    timezone: dt.tzinfo = dt.UTC


def uid_identifier(uid: str) -> dict[str, str]:
    return {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{uid}"}


def dicom_datetime(date: str | None, time: str | None, zone: dt.tzinfo) -> str | None:
    """A FHIR dateTime from DICOM DA/TM: a date alone, or date and time with an offset."""
    if not date or not re.fullmatch(r"\d{8}", date):
        return None
    try:
        day = dt.date(int(date[:4]), int(date[4:6]), int(date[6:8]))
    except ValueError:  # e.g. 20240230: not a date, so no date
        return None
    match = re.fullmatch(r"(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?", (time or "").strip())
    if not match:
        return day.isoformat()
    hour, minute, second = (int(match[i] or 0) for i in (1, 2, 3))
    if hour > 23 or minute > 59 or second > 59:
        return day.isoformat()
    moment = dt.datetime(day.year, day.month, day.day, hour, minute, second, tzinfo=zone)
    return moment.isoformat()


def _instant(date: str | None, time: str | None, zone: dt.tzinfo,
             fallback: dt.datetime | None) -> str | None:
    value = dicom_datetime(date, time, zone)
    if value and "T" in value:
        return value
    return fallback.astimezone(dt.UTC).isoformat(timespec="seconds") if fallback else None


def _subject(patient: PatientSummary, options: FhirOptions) -> dict[str, Any]:
    if not patient.patient_id:
        return {"type": "Patient", "display": "patient without an identifier in the images"}
    identifier: dict[str, Any] = {"value": patient.patient_id}
    issuer = patient.issuer_of_patient_id
    if issuer and _OID.match(issuer):
        identifier["system"] = f"urn:oid:{issuer}"
    elif issuer:
        # Not a system we can name; the configured one is for IDs without an issuer.
        identifier["assigner"] = {"display": issuer}
    elif options.patient_identifier_system:
        identifier["system"] = options.patient_identifier_system
    return {"type": "Patient", "identifier": identifier}


def _accession_identifier(accession: str, options: FhirOptions) -> dict[str, Any]:
    identifier: dict[str, Any] = {
        "type": {"coding": [{"system": V2_0203, "code": "ACSN"}]},
        "value": accession,
    }
    if options.accession_identifier_system:
        identifier["system"] = options.accession_identifier_system
    return identifier


def _coding(code: str) -> dict[str, str]:
    return {"system": DCM_SYSTEM, "code": code}


def _modality(code: str, version: FhirVersion) -> dict[str, Any]:
    return _coding(code) if version == "R4" else {"coding": [_coding(code)]}


def _based_on(study: StudySummary, options: FhirOptions) -> list[dict[str, Any]]:
    accession = study.accession_number or (study.order.accession_number if study.order else None)
    if not accession and not (study.order and study.order.placer_order_number):
        return []
    identifier = (
        _accession_identifier(accession, options)
        if accession
        else {"type": {"coding": [{"system": V2_0203, "code": "PLAC"}]},
              "value": study.order.placer_order_number}  # type: ignore[union-attr]
    )
    return [{"type": "ServiceRequest", "identifier": identifier}]


def _endpoint(options: FhirOptions) -> dict[str, Any]:
    connection = {"system": CONNECTION_TYPES, "code": "dicom-wado-rs"}
    endpoint: dict[str, Any] = {
        "resourceType": "Endpoint",
        "id": "dicomweb",
        "status": "active",
        "address": options.endpoint_url,
    }
    if options.version == "R4":
        endpoint["connectionType"] = connection
        endpoint["payloadType"] = [{"text": "DICOM"}]
        endpoint["payloadMimeType"] = ["application/dicom"]
    else:
        endpoint["connectionType"] = [{"coding": [connection]}]
        endpoint["payload"] = [{"type": [{"text": "DICOM"}], "mimeType": ["application/dicom"]}]
    return endpoint


def _unsigned(number: int | None) -> dict[str, int]:
    """FHIR numbers here are unsignedInt: DICOM IS values may be negative; leave those out."""
    return {"number": number} if number is not None and number >= 0 else {}


def _series(series: SeriesSummary, version: FhirVersion) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "uid": series.series_instance_uid,
        "numberOfInstances": len(series.instances),
        "modality": _modality(series.modality or "OT", version),
    }
    entry.update(_unsigned(series.series_number))
    if series.series_description:
        entry["description"] = series.series_description
    if series.body_part_examined:
        text = {"display": series.body_part_examined}
        entry["bodySite"] = text if version == "R4" else {"concept": {"text": text["display"]}}
    entry["instance"] = [
        {
            "uid": instance.sop_instance_uid,
            "sopClass": {"system": URI_SYSTEM, "code": f"urn:oid:{instance.sop_class_uid}"},
            **_unsigned(instance.instance_number),
            **({"title": instance.document_title} if instance.document_title else {}),
        }
        for instance in series.instances
    ]
    return entry


def imaging_study(study: StudySummary, options: FhirOptions) -> dict[str, Any]:
    """The ImagingStudy for a study, validated against the chosen FHIR version."""
    identifiers: list[dict[str, Any]] = [uid_identifier(study.study_instance_uid)]
    if study.accession_number:
        identifiers.append(_accession_identifier(study.accession_number, options))
    modalities = sorted({s.modality for s in study.series if s.modality})
    resource: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "identifier": identifiers,
        "status": "available",
        "subject": _subject(study.patient, options),
        "numberOfSeries": len(study.series),
        "numberOfInstances": sum(len(s.instances) for s in study.series),
        "series": [_series(series, options.version) for series in study.series],
    }
    if modalities:
        resource["modality"] = [_modality(code, options.version) for code in modalities]
    started = dicom_datetime(study.study_date, study.study_time, options.timezone)
    if started:
        resource["started"] = started
    if study.study_description and study.study_description.strip():
        resource["description"] = study.study_description
    referrer = " ".join((study.referring_physician_name or "").split("=")[0].replace(
        "^", " ").split())
    if referrer:
        resource["referrer"] = {"display": referrer}
    based_on = _based_on(study, options)
    if based_on:
        resource["basedOn"] = based_on
    if options.endpoint_url:
        resource["contained"] = [_endpoint(options)]
        resource["endpoint"] = [{"reference": "#dicomweb"}]
    model = ImagingStudyR4 if options.version == "R4" else ImagingStudyR5
    return _validated(model, resource)


def document_reference(
    study: StudySummary, series: SeriesSummary, instance: InstanceSummary, options: FhirOptions
) -> dict[str, Any]:
    """The DocumentReference for a document-like instance (PDF, CDA, structured report)."""
    attachment: dict[str, Any] = {"contentType": "application/dicom", "size": instance.size}
    if instance.sha1:
        attachment["hash"] = base64.b64encode(bytes.fromhex(instance.sha1)).decode("ascii")
    if options.attachment_base_url and instance.object_key:
        attachment["url"] = f"{options.attachment_base_url.rstrip('/')}/{instance.object_key}"
    if instance.document_title:
        attachment["title"] = instance.document_title
    created = _instant(instance.content_date, instance.content_time, options.timezone, None)
    if created:
        attachment["creation"] = created
    study_reference = {"type": "ImagingStudy", "identifier": uid_identifier(
        study.study_instance_uid)}
    resource: dict[str, Any] = {
        "resourceType": "DocumentReference",
        "status": "current",
        "identifier": [uid_identifier(instance.sop_instance_uid)],
        "subject": _subject(study.patient, options),
        "content": [{"attachment": attachment}],
        "description": instance.document_title or series.series_description or "DICOM document",
    }
    if instance.document_title:
        resource["type"] = {"text": instance.document_title}
    date = _instant(instance.content_date, instance.content_time, options.timezone,
                    instance.received_at)
    if date:
        resource["date"] = date
    if options.version == "R4":
        resource["masterIdentifier"] = uid_identifier(instance.sop_instance_uid)
        resource["context"] = {"related": [study_reference]}
        model: Any = DocumentReferenceR4
    else:
        resource["event"] = [{"reference": study_reference}]
        if series.modality:
            resource["modality"] = [{"coding": [_coding(series.modality)]}]
        model = DocumentReferenceR5
    validated = _validated(model, resource)
    if options.version == "R5":
        # R5 Attachment.size is integer64, which FHIR JSON writes as a string.
        validated["content"][0]["attachment"]["size"] = str(instance.size)
    return validated


def _validated(model: Any, resource: dict[str, Any]) -> dict[str, Any]:
    """Validate with fhir.resources and return the canonical JSON form."""
    instance = model.model_validate(resource)
    return dict(instance.model_dump(mode="json", exclude_none=True))
