"""What events a stable study raises. Pure: a loaded study and the configuration in,
event rows (with their payloads and sinks) out.

- one ``ImagingStudy`` per stable revision, to every FHIR-carrying sink;
- one ``DocumentReference`` per document-like instance (PDF, CDA, SR) new in this
  revision;
- one ``HL7`` "study available" message per HL7 destination.

FHIR events travel in an envelope: ``{"event_id", "type", "version",
"study_instance_uid", "resource_key", "created_at", "fhir_version", "resource"}``.
A higher ``version`` for the same study is a revision; the same ``event_id`` again is a
duplicate delivery.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from gateway.config import EventSinkConfig, Hl7Config, Hl7DestinationConfig
from gateway.dicom.attributes import is_document
from gateway.events.fhir import FhirOptions, document_reference, imaging_study
from gateway.hl7 import messages
from gateway.hl7.messages import PatientInfo, StudyMessageFacts
from gateway.index.events import LoadedStudy, NewEvent


@dataclass(frozen=True)
class EventTargets:
    fhir_sinks: tuple[EventSinkConfig, ...]
    hl7_destinations: tuple[Hl7DestinationConfig, ...]
    hl7: Hl7Config
    fhir: FhirOptions


@dataclass(frozen=True, slots=True)
class OrderFacts:
    """Order fields HL7 messages repeat (from the matched order, when there is one)."""

    placer_order_number: str = ""
    filler_order_number: str = ""
    procedure_code: str = ""
    procedure_text: str = ""
    patient: PatientInfo | None = None


@dataclass(frozen=True, slots=True)
class _Stamp:
    """What every event of one revision shares."""

    version: int
    study_uid: str
    created_at: dt.datetime
    fhir_version: str


def _fhir_event(kind: str, key: str, resource: dict[str, object], stamp: _Stamp,
                sinks: tuple[str, ...]) -> NewEvent:
    event_id = str(uuid.uuid4())
    payload = json.dumps({
        "event_id": event_id,
        "type": kind,
        "version": stamp.version,
        "study_instance_uid": stamp.study_uid,
        "resource_key": key,
        "created_at": stamp.created_at.isoformat(),
        "fhir_version": stamp.fhir_version,
        "resource": resource,
    }, separators=(",", ":"))
    return NewEvent(event_id, kind, key, payload, sinks)


def build_events(
    study: LoadedStudy,
    *,
    version: int,
    announced: Mapping[str, dt.datetime],
    targets: EventTargets,
    order: OrderFacts,
    now: dt.datetime,
) -> list[NewEvent]:
    """The events for revision *version* of *study*.

    DocumentReferences are raised for documents not *announced* yet, or received again
    (a new version) since they were.
    """
    summary = study.summary
    uid = summary.study_instance_uid
    sinks = tuple(sink.name for sink in targets.fhir_sinks)
    stamp = _Stamp(version, uid, now, targets.fhir.version)
    events: list[NewEvent] = []
    if sinks:
        events.append(_fhir_event(
            "ImagingStudy", uid, imaging_study(summary, targets.fhir), stamp, sinks
        ))
        for series in summary.series:
            for instance in series.instances:
                if not is_document(instance.sop_class_uid):
                    continue
                received = study.received_at.get(instance.sop_instance_uid)
                when = announced.get(instance.sop_instance_uid)
                if when is not None and (received is None or received <= when):
                    continue
                resource = document_reference(summary, series, instance, targets.fhir)
                events.append(_fhir_event(
                    "DocumentReference", instance.sop_instance_uid, resource, stamp, sinks
                ))
    for destination in targets.hl7_destinations:
        text = messages.study_available(
            destination.message, _message_facts(study, order, targets),
            application=targets.hl7.sending_application, facility=targets.hl7.sending_facility,
            to_app=destination.receiving_application,
            to_facility=destination.receiving_facility, version=targets.hl7.version,
            control_id=messages.new_control_id(),
        )
        events.append(NewEvent(str(uuid.uuid4()), "HL7", uid, text, (destination.name,)))
    return events


def _message_facts(
    study: LoadedStudy, order: OrderFacts, targets: EventTargets
) -> StudyMessageFacts:
    summary = study.summary
    patient = order.patient or PatientInfo(
        summary.patient.patient_id, summary.patient.issuer_of_patient_id,
        study.patient_name or "", study.patient_birth_date or "", study.patient_sex or "",
    )
    started = (summary.study_date or "") + (summary.study_time or "")[:6]
    return StudyMessageFacts(
        study_instance_uid=summary.study_instance_uid,
        accession_number=summary.accession_number or "",
        patient=patient,
        placer_order_number=order.placer_order_number,
        filler_order_number=order.filler_order_number,
        procedure_code=order.procedure_code,
        procedure_text=order.procedure_text or (summary.study_description or ""),
        study_datetime=started,
        number_of_instances=sum(len(series.instances) for series in summary.series),
        modalities=next(iter(sorted({s.modality for s in summary.series if s.modality})), ""),
        endpoint_url=targets.fhir.endpoint_url,
    )
