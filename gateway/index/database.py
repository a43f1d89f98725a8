"""Database engines and migrations.

SQLite is the embedded default: WAL mode, ``synchronous=FULL`` (a commit is on disk
when it returns) and ``BEGIN IMMEDIATE`` transactions so concurrent writers queue on
the lock instead of failing on upgrade. Within the process, transactions also queue on
a Python lock: SQLite's own busy handler polls with sleeps of 1 ms and more, which would
otherwise be added to a C-STORE whenever the uploader or a forwarder holds the write
lock. PostgreSQL is used through psycopg 3.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import Engine, create_engine, event, exc
from sqlalchemy.engine import make_url

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def describe_error(exc: BaseException) -> str:
    """A log-safe one-line description of a database error.

    Only the first line: SQLAlchemy appends the statement's parameters and PostgreSQL a
    DETAIL line, and either can carry patient data.
    """
    lines = str(exc).splitlines()
    return (lines[0] if lines else type(exc).__name__)[:300]


def make_engine(url: str, *, timeout: float = 10.0, pool_size: int = 16) -> Engine:
    """Create an engine for *url* with the settings the gateway relies on.

    *timeout* bounds how long a caller waits for a connection or a lock, so a C-STORE
    gets 0xA700 instead of hanging when the database is unavailable.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            parsed,
            connect_args={
                "check_same_thread": False,
                "timeout": timeout,
                "factory": _QueuedSqliteConnection,
            },
            pool_size=pool_size,
            max_overflow=pool_size,
            pool_timeout=timeout,
        )
        _configure_sqlite(engine, timeout)
        return engine
    lock_ms = int(timeout * 1000)
    return create_engine(
        parsed,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_timeout=timeout,
        pool_pre_ping=True,
        pool_recycle=1800,
        connect_args={
            "connect_timeout": max(1, round(timeout)),
            "options": f"-c lock_timeout={lock_ms}",
        },
    )


class _QueuedSqliteConnection(sqlite3.Connection):
    """A SQLite connection whose transactions hold its engine's in-process lock from
    ``BEGIN IMMEDIATE`` to ``COMMIT``/``ROLLBACK``."""

    write_lock: threading.Lock | None = None
    lock_timeout: float = 10.0
    holds_lock: bool = False

    def acquire_write_lock(self) -> bool:
        lock = self.write_lock
        if lock is None or self.holds_lock:
            return True
        if not lock.acquire(timeout=self.lock_timeout):
            return False
        self.holds_lock = True
        return True

    def commit(self) -> None:
        try:
            super().commit()
        finally:
            if not self.in_transaction:
                self.release_write_lock()

    def rollback(self) -> None:
        try:
            super().rollback()
        finally:
            if not self.in_transaction:
                self.release_write_lock()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.release_write_lock()

    def release_write_lock(self) -> None:
        if self.holds_lock and self.write_lock is not None:
            self.holds_lock = False
            self.write_lock.release()


def _configure_sqlite(engine: Engine, timeout: float) -> None:
    write_lock = threading.Lock()

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        if isinstance(dbapi_connection, _QueuedSqliteConnection):
            dbapi_connection.write_lock = write_lock
            dbapi_connection.lock_timeout = timeout
        # Let SQLAlchemy, not the sqlite3 module, decide when transactions begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        dbapi_connection = connection.connection.dbapi_connection
        queued = isinstance(dbapi_connection, _QueuedSqliteConnection)
        if queued and not dbapi_connection.acquire_write_lock():
            raise exc.OperationalError(
                "BEGIN IMMEDIATE", None, sqlite3.OperationalError("database is locked")
            )
        try:
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        except BaseException:
            if queued:
                dbapi_connection.release_write_lock()
            raise


def alembic_config(engine: Engine) -> AlembicConfig:
    """An Alembic configuration bound to *engine* (no alembic.ini needed)."""
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["engine"] = engine
    return config


def migrate(engine: Engine) -> None:
    """Bring the schema up to date (idempotent)."""
    command.upgrade(alembic_config(engine), "head")
