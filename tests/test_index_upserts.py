"""The study and series rows: their indexed columns are written only when they change,
with the meaning the upserts always had (a new non-empty value wins, an empty one never
erases)."""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import Engine, text

from gateway.dicom.attributes import InstanceAttributes
from gateway.index.database import make_engine, migrate
from gateway.index.repository import InstanceRecord, indexed_changes, record_instance

STORED = {"patient_pk": 1, "accession_number": "ACC1", "study_date": "20260101"}


@pytest.mark.parametrize(("incoming", "expected"), [
    ({"patient_pk": 1, "accession_number": "ACC1", "study_date": "20260101"}, {}),
    ({"patient_pk": 1, "accession_number": None, "study_date": None}, {}),
    ({"patient_pk": 1, "accession_number": "ACC2", "study_date": None},
     {"accession_number": "ACC2"}),
    ({"patient_pk": 2, "accession_number": "ACC1", "study_date": "20260101"},
     {"patient_pk": 2}),
    ({"patient_pk": 1, "accession_number": "", "study_date": "20260101"},
     {"accession_number": ""}),  # as coalesce: only NULL keeps the stored value
], ids=["same", "absent values keep the stored", "new accession", "patient moved",
        "empty string is a value"])
def test_indexed_changes(incoming: dict[str, Any], expected: dict[str, Any]) -> None:
    assert indexed_changes(STORED, incoming, replace=("patient_pk",)) == expected


def test_a_stored_null_is_filled_and_a_replace_column_may_become_null() -> None:
    assert indexed_changes({"a": None, "b": 1}, {"a": "x", "b": None}, replace=("b",)) == {
        "a": "x", "b": None}


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    migrate(engine)
    yield engine
    engine.dispose()


STUDY, SERIES = "2.25." + str(uuid.uuid4().int), "2.25." + str(uuid.uuid4().int)


def _record(**attributes: Any) -> InstanceRecord:
    uid = "2.25." + str(uuid.uuid4().int)
    attrs = InstanceAttributes(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.4", sop_instance_uid=uid,
        study_instance_uid=STUDY, series_instance_uid=SERIES, patient_id="P1",
    )
    return InstanceRecord(
        attributes=replace(attrs, **attributes), transfer_syntax_uid="1.2.840.10008.1.2.1",
        size=100, dataset_offset=10, sha256=hashlib.sha256(uid.encode()).hexdigest(),
        spool_name=uuid.uuid4().hex, received_by="node-t", calling_ae="MOD",
        called_ae="GATEWAY", association_id=None, received_at=dt.datetime.now(dt.UTC),
    )


def _study(engine: Engine) -> tuple[Any, ...]:
    with engine.connect() as connection:
        return tuple(connection.execute(text(
            "SELECT p.patient_id, s.accession_number, s.study_date, se.modality, s.change_seq"
            " FROM study s JOIN patient p ON p.id = s.patient_pk"
            " JOIN series se ON se.study_pk = s.id")).one())


@pytest.mark.integration
def test_later_instances_fill_correct_and_never_erase_the_study_and_series(
    engine: Engine,
) -> None:
    steps: list[tuple[dict[str, Any], tuple[Any, ...]]] = [
        ({}, ("P1", None, None, None, 1)),
        ({"accession_number": "ACC1", "study_date": "20260101", "modality": "MR"},
         ("P1", "ACC1", "20260101", "MR", 2)),
        ({}, ("P1", "ACC1", "20260101", "MR", 3)),  # absent values never erase
        ({"accession_number": "ACC2", "modality": "CT"}, ("P1", "ACC2", "20260101", "CT", 4)),
        ({"patient_id": "P2"}, ("P2", "ACC2", "20260101", "CT", 5)),  # the study moves
    ]
    for attributes, expected in steps:
        with engine.begin() as connection:
            record_instance(connection, _record(**attributes))
        assert _study(engine) == expected, attributes
