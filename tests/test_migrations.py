"""Schema changes go through migrations that produce exactly the declared schema."""

from __future__ import annotations

import threading
import time

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.exc import OperationalError

from gateway.index.database import make_engine, migrate
from gateway.index.schema import Base


def test_migrations_produce_the_declared_schema(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        migrate(engine)
        migrate(engine)  # idempotent: a restart runs it again
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            differences = compare_metadata(context, Base.metadata)
            tables = set(inspect(connection).get_table_names())
    finally:
        engine.dispose()
    assert differences == []
    assert {"patient", "study", "series", "instance", "association", "alembic_version"} <= tables


def test_sqlite_runs_in_wal_mode_with_full_sync(tmp_path) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(f"sqlite:///{tmp_path / 'index.db'}")
    try:
        with engine.connect() as connection:
            mode = connection.exec_driver_sql("PRAGMA journal_mode").scalar()
            sync = connection.exec_driver_sql("PRAGMA synchronous").scalar()
    finally:
        engine.dispose()
    assert mode == "wal"
    assert sync == 2  # FULL: a commit is on disk when it returns


def test_sqlite_transactions_queue_in_the_process_and_free_the_lock(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # Writers wait on an in-process lock (woken as soon as it is free) rather than on
    # SQLite's busy handler, which sleeps in steps of a millisecond and more.
    engine = make_engine(f"sqlite:///{tmp_path}/q.db", timeout=0.3)
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE t (v INTEGER)")
    first = engine.connect()
    first.begin()
    first.exec_driver_sql("INSERT INTO t VALUES (1)")
    started = time.monotonic()
    with pytest.raises(OperationalError, match="database is locked"), engine.begin() as second:
        second.exec_driver_sql("INSERT INTO t VALUES (2)")
    assert 0.25 <= time.monotonic() - started < 3
    first.commit()  # releases the lock ...
    first.begin()
    first.exec_driver_sql("INSERT INTO t VALUES (3)")
    first.rollback()  # ... and so does a rollback
    first.close()
    with engine.begin() as third:
        third.exec_driver_sql("INSERT INTO t VALUES (4)")
    with engine.connect() as reader:
        assert [row[0] for row in reader.exec_driver_sql("SELECT v FROM t ORDER BY v")] == [1, 4]


def test_sqlite_waiting_writer_proceeds_when_the_holder_commits(tmp_path) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(f"sqlite:///{tmp_path}/q.db", timeout=5)
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE t (v INTEGER)")
    holder = engine.connect()
    holder.begin()
    holder.exec_driver_sql("INSERT INTO t VALUES (1)")
    done = threading.Event()

    def write() -> None:
        with engine.begin() as connection:
            connection.exec_driver_sql("INSERT INTO t VALUES (2)")
        done.set()

    writer = threading.Thread(target=write)
    writer.start()
    assert not done.wait(0.2)  # queued behind the holder
    holder.commit()
    holder.close()
    assert done.wait(2)
    writer.join()
