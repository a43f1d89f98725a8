"""Schema changes go through migrations that produce exactly the declared schema."""

from __future__ import annotations

import threading
import time
from typing import Any

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


def _assert_writer_times_out(engine: Any) -> None:
    """A write through *engine* (timeout 0.3 s) gives up on the held lock in time."""
    started = time.monotonic()
    with pytest.raises(OperationalError, match="database is locked"), engine.begin() as other:
        other.exec_driver_sql("INSERT INTO t VALUES (2)")
    assert 0.25 <= time.monotonic() - started < 3


def test_sqlite_transactions_queue_in_the_process_and_free_the_lock(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # Writers wait on an in-process lock (woken as soon as it is free) rather than on
    # SQLite's busy handler, which sleeps in steps of a millisecond and more.
    engine = make_engine(f"sqlite:///{tmp_path}/q.db", timeout=0.3)
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE t (v INTEGER)")
    first = engine.connect()
    first.begin()
    first.exec_driver_sql("INSERT INTO t VALUES (1)")
    _assert_writer_times_out(engine)
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


def test_sqlite_writers_of_two_processes_queue_on_the_file_lock(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # The listener and its worker process each have an engine on the same file; two
    # engines in one process hold the file lock through separate descriptors, exactly
    # like two processes do.
    url = f"sqlite:///{tmp_path}/q.db"
    listener, worker = make_engine(url, timeout=0.3), make_engine(url, timeout=5)
    with listener.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE t (v INTEGER)")
    assert (tmp_path / "q.db.write-lock").exists()
    holder = worker.connect()
    holder.begin()
    holder.exec_driver_sql("INSERT INTO t VALUES (1)")
    _assert_writer_times_out(listener)
    holder.commit()
    holder.close()

    errors: list[BaseException] = []

    def write(engine: Any, base: int) -> None:
        try:
            for value in range(base, base + 200):
                with engine.begin() as connection:
                    connection.exec_driver_sql(f"INSERT INTO t VALUES ({value})")
        except BaseException as exc:
            errors.append(exc)

    relaxed = make_engine(url, timeout=5)
    threads = [threading.Thread(target=write, args=(engine, base))
               for engine, base in ((worker, 1000), (relaxed, 2000), (worker, 3000))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    with listener.connect() as reader:
        assert reader.exec_driver_sql("SELECT count(*) FROM t").scalar_one() == 601
    for engine in (listener, worker, relaxed):
        engine.dispose()


def test_sqlite_without_a_usable_lock_file_still_writes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from structlog.testing import capture_logs

    (tmp_path / "q.db.write-lock").mkdir()  # cannot be opened as a file
    engine = make_engine(f"sqlite:///{tmp_path}/q.db", timeout=1)
    with capture_logs() as logs:
        with engine.begin() as connection:
            connection.exec_driver_sql("CREATE TABLE t (v INTEGER)")
        with engine.begin() as connection:
            connection.exec_driver_sql("INSERT INTO t VALUES (1)")
    engine.dispose()
    assert [entry["event"] for entry in logs] == ["database_write_lock_unavailable"]
