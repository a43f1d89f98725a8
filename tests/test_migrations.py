"""Schema changes go through migrations that produce exactly the declared schema."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import func, inspect, select
from sqlalchemy.exc import OperationalError

from gateway.index import repository
from gateway.index.database import alembic_config, make_engine, migrate, reading
from gateway.index.repository import instance_table
from gateway.index.schema import Base, current_instance


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


def _plan(connection: Any, statement: Any) -> str:
    sql = str(statement.compile(connection, compile_kwargs={"literal_binds": True}))
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql("SET LOCAL enable_seqscan = off")  # the index if usable
        return " ".join(row[0] for row in connection.exec_driver_sql(f"EXPLAIN {sql}"))
    return " ".join(row[3] for row in connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}"))


@pytest.mark.parametrize(("name", "statement", "index"), [
    ("current version by SOP Instance UID (every C-STORE)",
     lambda: repository._build_find_current().params(uid="1.2.3"),
     "uq_instance_current_sop_instance_uid"),
    ("current versions of files to import",
     lambda: select(instance_table.c.sha256).where(
         instance_table.c.sop_instance_uid.in_(["1.2.3", "1.2.4"]), current_instance()),
     "uq_instance_current_sop_instance_uid"),
    ("unrouted count (metrics, dashboard)",
     lambda: select(func.count()).where(
         instance_table.c.routed.is_(False), instance_table.c.is_current.is_(True)),
     "ix_instance_unrouted"),
], ids=["find-current", "import-digests", "unrouted-count"])
def test_the_lookups_the_lighter_indexes_must_serve_use_an_index(
    database_url: str, name: str, statement: Any, index: str
) -> None:
    engine = make_engine(database_url)
    try:
        migrate(engine)
        with engine.begin() as connection:
            plan = _plan(connection, statement())
    finally:
        engine.dispose()
    assert index in plan, f"{name}: {plan}"


def test_the_lighter_index_migration_downgrades_and_upgrades(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        migrate(engine)
        config = alembic_config(engine)
        command.downgrade(config, "0004")
        with engine.connect() as connection:
            before = {ix["name"] for ix in inspect(connection).get_indexes("instance")}
        command.upgrade(config, "head")
        with engine.connect() as connection:
            after = {ix["name"] for ix in inspect(connection).get_indexes("instance")}
    finally:
        engine.dispose()
    assert {"ix_instance_sop_instance_uid", "ix_instance_association_id",
            "ix_instance_routed"} <= before
    assert "ix_instance_unrouted" not in before
    assert after == before - {"ix_instance_sop_instance_uid", "ix_instance_association_id",
                              "ix_instance_routed"} | {"ix_instance_unrouted"}


def test_sqlite_reads_neither_wait_for_the_writer_nor_hold_it_up(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/r.db", timeout=0.3)
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE t (v INTEGER)")
        connection.exec_driver_sql("INSERT INTO t VALUES (1)")
    writer = engine.connect()
    writer.begin()
    writer.exec_driver_sql("INSERT INTO t VALUES (2)")  # holds the write lock
    try:
        started = time.monotonic()
        with reading(engine) as reader:
            assert reader.exec_driver_sql("SELECT count(*) FROM t").scalar() == 1
            # The reader's open transaction does not hold up a commit either.
            writer.commit()
            assert reader.exec_driver_sql("SELECT count(*) FROM t").scalar() == 1  # snapshot
        assert time.monotonic() - started < 0.25
        with reading(engine) as reader:
            assert reader.exec_driver_sql("SELECT count(*) FROM t").scalar() == 2
    finally:
        writer.close()
        engine.dispose()
