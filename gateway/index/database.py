"""Database engines and migrations.

SQLite is the embedded default: WAL mode, ``synchronous=FULL`` (a commit is on disk
when it returns) and ``BEGIN IMMEDIATE`` transactions so concurrent writers queue on
the lock instead of failing on upgrade. Within the process, transactions also queue on
a Python lock: SQLite's own busy handler polls with sleeps of 1 ms and more, which would
otherwise be added to a C-STORE whenever the uploader or a forwarder holds the write
lock. The node's worker process writes to the same file, so the lock is also a file
lock (``flock`` on ``<database>.write-lock``), taken after the in-process one.
PostgreSQL is used through psycopg 3.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import Connection, Engine, create_engine, event, exc
from sqlalchemy.engine import make_url

from gateway.logs import get_logger

log = get_logger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def describe_error(exc: BaseException) -> str:
    """A log-safe one-line description of a database error.

    Only the first line: SQLAlchemy appends the statement's parameters and PostgreSQL a
    DETAIL line, and either can carry patient data.
    """
    lines = str(exc).splitlines()
    return (lines[0] if lines else type(exc).__name__)[:300]


_READ_ONLY = "gateway_read_only"


def reading(engine: Engine) -> Connection:
    """A connection for reads only (use it in a ``with`` block).

    On SQLite its transactions begin deferred and take no write lock: in WAL mode a
    reader never waits for the writer, nor the writer for it, so a forwarder reading an
    instance's bytes or a metrics scrape does not queue with the C-STOREs being
    committed. It must not write (a deferred transaction that turns into a write can
    fail on the lock instead of waiting for it).
    """
    return engine.connect().execution_options(**{_READ_ONLY: True})


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
        lock_path = None
        if database and database != ":memory:":
            lock_path = Path(database).with_name(Path(database).name + ".write-lock")
        _configure_sqlite(engine, timeout, WriteLock(lock_path))
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


class WriteLock:
    """One writer at a time: across this process's threads, then across processes.

    The file lock is polled (there is no timed ``flock``), from 0.1 ms up to 2 ms
    between tries: the other process's transactions are short, and SQLite's own busy
    handler would sleep 1, 2, 5, 10 ms... between its tries.
    """

    def __init__(self, path: Path | None) -> None:
        self._threads = threading.Lock()
        self._path = path
        self._fd: int | None = None

    def acquire(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        if not self._threads.acquire(timeout=timeout):
            return False
        if self._path is None:
            return True
        try:
            if self._fd is None and not self._open():
                return True
            fd = self._fd
            assert fd is not None
            pause = 0.0001
            while not self._try_file_lock(fd):
                if time.monotonic() >= deadline:
                    break
                time.sleep(pause)
                pause = min(pause * 2, 0.002)
            else:
                return True
        except BaseException:
            self._threads.release()
            raise
        self._threads.release()
        return False

    def _open(self) -> bool:
        """Open the lock file (read-only is enough for flock, whoever created it)."""
        assert self._path is not None
        try:
            self._fd = os.open(self._path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            # SQLite's own locking still keeps the data safe; only the waits get longer.
            log.warning("database_write_lock_unavailable", path=str(self._path),
                        error=exc.strerror)
            self._path = None
            return False
        return True

    @staticmethod
    def _try_file_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._threads.release()

    def __del__(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)


class _QueuedSqliteConnection(sqlite3.Connection):
    """A SQLite connection whose transactions hold its engine's in-process lock from
    ``BEGIN IMMEDIATE`` to ``COMMIT``/``ROLLBACK``."""

    write_lock: WriteLock | None = None
    lock_timeout: float = 10.0
    holds_lock: bool = False

    def acquire_write_lock(self) -> bool:
        lock = self.write_lock
        if lock is None or self.holds_lock:
            return True
        if not lock.acquire(self.lock_timeout):
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


def _configure_sqlite(engine: Engine, timeout: float, write_lock: WriteLock) -> None:
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
        if connection.get_execution_options().get(_READ_ONLY):
            _begin(dbapi_connection, "BEGIN", engine)
            return
        queued = isinstance(dbapi_connection, _QueuedSqliteConnection)
        if queued and not dbapi_connection.acquire_write_lock():
            raise exc.OperationalError(
                "BEGIN IMMEDIATE", None, sqlite3.OperationalError("database is locked")
            )
        try:
            _begin(dbapi_connection, "BEGIN IMMEDIATE", engine)
        except BaseException:
            if queued:
                dbapi_connection.release_write_lock()
            raise


def _begin(dbapi_connection: Any, statement: str, engine: Engine) -> None:
    """Begin on the driver's connection: SQLAlchemy's execution of the statement cost
    more CPU than the BEGIN, on every C-STORE. Its errors are raised as SQLAlchemy's."""
    try:
        dbapi_connection.execute(statement)
    except sqlite3.Error as error:
        raise exc.DBAPIError.instance(
            statement, (), error, sqlite3.Error, dialect=engine.dialect
        ) from error


def alembic_config(engine: Engine) -> AlembicConfig:
    """An Alembic configuration bound to *engine* (no alembic.ini needed)."""
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["engine"] = engine
    return config


def migrate(engine: Engine) -> None:
    """Bring the schema up to date (idempotent)."""
    command.upgrade(alembic_config(engine), "head")
