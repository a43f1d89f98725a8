"""HL7 orders and patient updates in the index, and order/study reconciliation."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Connection, Table, desc, or_, select, update

from gateway.dicom.attributes import InstanceAttributes
from gateway.hl7.messages import OrderInfo, PatientInfo
from gateway.hl7.reconcile import Demographics, mismatches
from gateway.index.repository import dialect_insert, patient_key, patient_table, study_table
from gateway.index.schema import Hl7Message, Hl7Order

order_table = cast(Table, Hl7Order.__table__)
hl7_log_table = cast(Table, Hl7Message.__table__)


def upsert_order(
    connection: Connection, order: OrderInfo, message_type: str, control_id: str,
    now: dt.datetime,
) -> int:
    """Record an order (the latest message for the same order key wins)."""
    values = {
        "order_key": order.order_key,
        "accession_number": order.accession_number or None,
        "placer_order_number": order.placer_order_number or None,
        "filler_order_number": order.filler_order_number or None,
        "requested_procedure_id": order.requested_procedure_id or None,
        "study_instance_uid": order.study_instance_uid or None,
        "patient_id": order.patient.patient_id or None,
        "issuer_of_patient_id": order.patient.issuer or None,
        "patient_name": order.patient.name or None,
        "patient_birth_date": order.patient.birth_date or None,
        "patient_sex": order.patient.sex or None,
        "procedure_code": order.procedure_code or None,
        "procedure_text": order.procedure_text or None,
        "modality": order.modality or None,
        "scheduled_station_ae": order.scheduled_station_ae or None,
        "order_control": order.order_control or None,
        "order_status": order.order_status or None,
        "message_type": message_type,
        "message_control_id": control_id or None,
        "received_at": now,
        "updated_at": now,
    }
    stmt = dialect_insert(connection, order_table).values(**values)
    changed = {key: stmt.excluded[key] for key in values if key not in ("order_key", "received_at")}
    stmt = stmt.on_conflict_do_update(index_elements=["order_key"], set_=changed)
    return int(connection.execute(stmt.returning(order_table.c.id)).scalar_one())


@dataclass(frozen=True, slots=True)
class Reconciliation:
    study_pk: int
    order_pk: int
    mismatched: list[str]
    newly_flagged: bool
    """The study was not flagged against this order before (so metrics count it once,
    though it is reconciled again when the order arrives, when it is stable and on each
    revision)."""


def reconcile_study(connection: Connection, study_pk: int) -> Reconciliation | None:
    """Link a study to the order with its accession number; flag demographic mismatches."""
    s = study_table.c
    study = connection.execute(
        select(s.id, s.accession_number, s.order_pk, s.patient_pk, s.demographics_mismatch)
        .where(s.id == study_pk)
    ).first()
    if study is None or not study.accession_number:
        return None
    o = order_table.c
    order = connection.execute(
        select(o.id, o.patient_id, o.patient_name, o.patient_birth_date, o.patient_sex)
        .where(o.accession_number == study.accession_number)
        .order_by(desc(o.updated_at))
        .limit(1)
    ).first()
    if order is None:
        return None
    p = patient_table.c
    patient = connection.execute(
        select(p.patient_id, p.patient_name, p.patient_birth_date, p.patient_sex)
        .where(p.id == study.patient_pk)
    ).one()
    different = mismatches(
        Demographics(patient.patient_id, patient.patient_name, patient.patient_birth_date,
                     patient.patient_sex),
        Demographics(order.patient_id, order.patient_name, order.patient_birth_date,
                     order.patient_sex),
    )
    connection.execute(
        update(study_table)
        .where(s.id == study_pk)
        .values(order_pk=order.id, demographics_mismatch=", ".join(different) or None)
    )
    flagged_before = study.order_pk == order.id and bool(study.demographics_mismatch)
    return Reconciliation(study_pk, order.id, different,
                          newly_flagged=bool(different) and not flagged_before)


def studies_with_accession(connection: Connection, accession: str) -> list[int]:
    s = study_table.c
    return [row[0] for row in connection.execute(
        select(s.id).where(s.accession_number == accession)
    )]


def _matching_patients(connection: Connection, patient: PatientInfo) -> list[int]:
    """Patient rows with this Patient ID whose issuer is the same or unknown on a side."""
    p = patient_table.c
    stmt = select(p.id).where(p.patient_id == patient.patient_id, p.merged_into_pk.is_(None))
    if patient.issuer:
        stmt = stmt.where(or_(p.issuer_of_patient_id == "",
                              p.issuer_of_patient_id == patient.issuer))
    return [row[0] for row in connection.execute(stmt)]


def update_patient(connection: Connection, patient: PatientInfo, now: dt.datetime) -> int:
    """ADT^A08: apply new demographics to the matching patients; returns how many."""
    ids = _matching_patients(connection, patient)
    values: dict[str, Any] = {"updated_at": now}
    if patient.name:
        values["patient_name"] = patient.name
    if patient.birth_date:
        values["patient_birth_date"] = patient.birth_date
    if patient.sex:
        values["patient_sex"] = patient.sex
    if ids:
        connection.execute(
            update(patient_table).where(patient_table.c.id.in_(ids)).values(**values)
        )
    return len(ids)


def merge_patients(
    connection: Connection, surviving: PatientInfo, prior: PatientInfo, now: dt.datetime
) -> int:
    """ADT^A40: move the prior patient's studies to the surviving one; returns studies moved."""
    prior_ids = _matching_patients(connection, prior)
    if not prior_ids:
        return 0
    target = _surviving_patient(connection, surviving, now)
    prior_ids = [pk for pk in prior_ids if pk != target]
    if not prior_ids:
        return 0
    moved = connection.execute(
        update(study_table).where(study_table.c.patient_pk.in_(prior_ids))
        .values(patient_pk=target)
    )
    connection.execute(
        update(patient_table).where(patient_table.c.id.in_(prior_ids))
        .values(merged_into_pk=target, updated_at=now)
    )
    return int(moved.rowcount)


def _surviving_patient(connection: Connection, patient: PatientInfo, now: dt.datetime) -> int:
    existing = _matching_patients(connection, patient)
    if existing:
        return existing[0]
    key = patient_key(InstanceAttributes(
        sop_class_uid="", sop_instance_uid="", study_instance_uid="", series_instance_uid="",
        patient_id=patient.patient_id, issuer_of_patient_id=patient.issuer,
    ))
    stmt = dialect_insert(connection, patient_table).values(
        patient_key=key, patient_id=patient.patient_id, issuer_of_patient_id=patient.issuer,
        patient_name=patient.name or None, patient_birth_date=patient.birth_date or None,
        patient_sex=patient.sex or None, updated_at=now,
    ).on_conflict_do_nothing(index_elements=["patient_key"])
    connection.execute(stmt)
    p = patient_table.c
    return int(connection.execute(select(p.id).where(p.patient_key == key)).scalar_one())


def log_message(
    connection: Connection, *, peer_address: str, message_type: str | None,
    control_id: str | None, ack_code: str, detail: str | None, now: dt.datetime,
) -> None:
    connection.execute(hl7_log_table.insert().values(
        received_at=now, peer_address=peer_address, message_type=message_type,
        control_id=control_id, ack_code=ack_code, detail=detail,
    ))


@dataclass(frozen=True, slots=True)
class OrderView:
    id: int
    accession_number: str | None
    placer_order_number: str | None
    procedure: str | None
    modality: str | None
    order_status: str | None
    updated_at: dt.datetime
    matched_studies: int
    mismatch: str | None


def recent_orders(connection: Connection, limit: int = 50) -> list[OrderView]:
    o, s = order_table.c, study_table.c
    orders = connection.execute(
        select(o.id, o.accession_number, o.placer_order_number, o.procedure_text,
               o.procedure_code, o.modality, o.order_status, o.updated_at)
        .order_by(desc(o.updated_at)).limit(limit)
    ).all()
    views = []
    for order in orders:
        studies = connection.execute(
            select(s.demographics_mismatch).where(s.order_pk == order.id)
        ).all()
        mismatch = ", ".join(sorted({row[0] for row in studies if row[0]})) or None
        views.append(OrderView(
            order.id, order.accession_number, order.placer_order_number,
            order.procedure_text or order.procedure_code, order.modality, order.order_status,
            order.updated_at, len(studies), mismatch,
        ))
    return views


def recent_messages(connection: Connection, limit: int = 50) -> list[Any]:
    h = hl7_log_table.c
    return list(connection.execute(
        select(h.received_at, h.peer_address, h.message_type, h.control_id, h.ack_code, h.detail)
        .order_by(desc(h.id)).limit(limit)
    ).all())


def order_for_study(connection: Connection, study_instance_uid: str) -> Any:
    """The order of a study (for demographics coercion on forward), or None: the one it was
    linked to, else the latest order with its accession number (forwarding can start
    before the study is stable and linked)."""
    s, o = study_table.c, order_table.c
    columns = (o.patient_id, o.issuer_of_patient_id, o.patient_name, o.patient_birth_date,
               o.patient_sex, o.accession_number)
    linked = connection.execute(
        select(*columns).join(study_table, s.order_pk == o.id)
        .where(s.study_instance_uid == study_instance_uid)
    ).first()
    if linked is not None:
        return linked
    return connection.execute(
        select(*columns).join(study_table, s.accession_number == o.accession_number)
        .where(s.study_instance_uid == study_instance_uid, o.accession_number.is_not(None))
        .order_by(desc(o.updated_at)).limit(1)
    ).first()
