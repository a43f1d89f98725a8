"""Prepared statements run on the driver's cursor exactly as SQLAlchemy would run them."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import (
    Boolean,
    Column,
    Engine,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    bindparam,
    event,
    exc,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite

from gateway.index import repository
from gateway.index.database import describe_error, make_engine, migrate
from gateway.index.prepared import Prepared
from gateway.index.schema import UTCDateTime

pytestmark = pytest.mark.integration

metadata = MetaData()
scratch = Table(
    "prepared_scratch", metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String, unique=True, nullable=False),
    Column("at", UTCDateTime),
    Column("flag", Boolean),
    Column("n", Integer, default=5),
    Column("data", LargeBinary),
    Column("seq", Integer, nullable=False, server_default="0"),
)
WHEN = dt.datetime(2026, 12, 5, 4, 30, 1, 123456, tzinfo=dt.timezone(dt.timedelta(hours=2)))


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    metadata.create_all(engine)
    yield engine
    engine.dispose()


def _insert(engine: Engine) -> Any:
    insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
    statement = insert(scratch)
    return statement.on_conflict_do_update(
        index_elements=[scratch.c.name], set_={"seq": scratch.c.seq + 1},
    ).returning(scratch.c.id, scratch.c.n, scratch.c.seq)


def test_values_defaults_and_literals_are_bound_as_sqlalchemy_binds_them(engine: Engine) -> None:
    prepared = Prepared(_insert(engine), engine.dialect, ("name", "at", "flag", "data"))
    values = {"name": "a", "at": WHEN, "flag": True, "data": b"\x00\xff" * 10}
    with engine.begin() as connection:
        first = prepared.execute(connection, values)
        again = prepared.execute(connection, values)  # the conflict: seq + 1 (a literal 1)
        stored = connection.execute(select(scratch)).one()
    assert (first.n, first.seq, again.id, again.seq) == (5, 0, first.id, 1)
    assert stored.at == WHEN and stored.at.tzinfo == dt.UTC
    assert (stored.flag, stored.n, stored.data) == (True, 5, b"\x00\xff" * 10)


def test_returned_columns_are_converted_as_sqlalchemy_converts_them(engine: Engine) -> None:
    with engine.begin() as connection:
        connection.execute(scratch.insert(), {"name": "b", "at": WHEN, "flag": False})
    prepared = Prepared(
        select(scratch.c.at, scratch.c.flag).where(scratch.c.name == bindparam("wanted")),
        engine.dialect, ("wanted",))
    with engine.connect() as connection:
        row = prepared.execute(connection, {"wanted": "b"})
        missing = prepared.execute(connection, {"wanted": "nobody"})
    assert (row.at, row.at.tzinfo, row.flag) == (WHEN, dt.UTC, False)
    assert missing is None


def test_many_rows_in_one_call(engine: Engine) -> None:
    prepared = Prepared(scratch.insert(), engine.dialect, ("name", "n"))
    with engine.begin() as connection:
        prepared.execute_many(connection, [{"name": f"r{i}", "n": i} for i in range(5)])
        rows = connection.execute(select(scratch.c.name, scratch.c.n).order_by("n")).all()
    assert [tuple(row) for row in rows] == [(f"r{i}", i) for i in range(5)]


def test_driver_errors_are_sqlalchemys_and_hide_the_values(engine: Engine) -> None:
    prepared = Prepared(scratch.insert(), engine.dialect, ("name", "data"))
    with engine.begin() as connection:
        prepared.execute(connection, {"name": "PATIENT^SECRET", "data": None})
    with pytest.raises(exc.IntegrityError) as raised, engine.begin() as connection:
        prepared.execute(connection, {"name": "PATIENT^SECRET", "data": None})
    assert "parameters hidden" in str(raised.value)
    # PostgreSQL's DETAIL line quotes the value: what is logged is the first line only.
    assert "PATIENT^SECRET" not in describe_error(raised.value)


def test_a_value_that_cannot_be_bound_is_a_statement_error_without_the_value(
    engine: Engine
) -> None:
    prepared = Prepared(scratch.insert(), engine.dialect, ("name", "at"))
    with pytest.raises(exc.StatementError) as raised, engine.begin() as connection:
        prepared.execute(connection, {"name": "x", "at": "PATIENT^SECRET 2026-12-05"})
    assert "PATIENT^SECRET" not in str(raised.value)


def test_a_parameter_neither_given_nor_literal_is_refused_when_prepared(engine: Engine) -> None:
    statement = select(scratch.c.id).where(scratch.c.name == bindparam("wanted"))
    with pytest.raises(ValueError, match="wanted"):
        Prepared(statement, engine.dialect, ())


def _sample_values() -> dict[str, dict[str, Any]]:
    now = dt.datetime(2026, 12, 5, 4, 0, tzinfo=dt.UTC)
    return {
        "upsert_patient": {"patient_key": "id:|P1", "patient_id": "P1",
                           "issuer_of_patient_id": "", "patient_name": "A^B",
                           "patient_birth_date": None, "patient_sex": "O", "updated_at": now},
        "upsert_study": {"study_instance_uid": "1.2.3", "patient_pk": 1, "accession_number": "A",
                         "study_date": "20261205", "study_time": None,
                         "study_description": "d", "study_id": None,
                         "referring_physician_name": None, "first_received_at": now,
                         "last_received_at": now, "change_seq": 1},
        "upsert_series": {"series_instance_uid": "1.2.3.4", "study_pk": 1, "modality": "MR",
                          "series_number": 3, "series_description": None,
                          "body_part_examined": None, "last_received_at": now},
        "find_current": {"uid": "1.2.3.4.5"},
    }


@pytest.mark.parametrize("name", list(_sample_values()))
def test_the_c_store_statements_send_the_driver_what_sqlalchemy_sends(
    database_url: str, name: str
) -> None:
    # SQLAlchemy itself is the oracle: the SQL and parameters it hands the driver.
    engine = make_engine(database_url)
    try:
        migrate(engine)
        sent: list[tuple[str, Any]] = []

        @event.listens_for(engine, "before_cursor_execute")
        def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any,
                    *_args: Any) -> None:
            sent.append((statement, parameters))

        with engine.connect() as connection:
            prepared: Prepared = getattr(repository._statements(connection), name)
            statement = {
                "upsert_patient": repository._build_upsert_patient,
                "upsert_study": repository._build_upsert_study,
                "upsert_series": repository._build_upsert_series,
            }.get(name)
            built = (statement(postgresql.insert if engine.dialect.name == "postgresql"
                               else sqlite.insert) if statement
                     else repository._build_find_current())
            values = _sample_values()[name]
            transaction = connection.begin()
            with contextlib.suppress(exc.IntegrityError):  # no study or patient row: fine
                connection.execute(built, values)
            transaction.rollback()
        sql, parameters = sent[-1]
        assert prepared.sql == sql
        assert prepared.parameters(values) == parameters
    finally:
        engine.dispose()
