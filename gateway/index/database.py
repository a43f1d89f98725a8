"""Database engines and migrations.

SQLite is the embedded default: WAL mode, ``synchronous=FULL`` (a commit is on disk
when it returns) and ``BEGIN IMMEDIATE`` transactions so concurrent writers queue on
the lock instead of failing on upgrade. PostgreSQL is used through psycopg 3.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import Engine, create_engine, event
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
            connect_args={"check_same_thread": False, "timeout": timeout},
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


def _configure_sqlite(engine: Engine, timeout: float) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
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
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def alembic_config(engine: Engine) -> AlembicConfig:
    """An Alembic configuration bound to *engine* (no alembic.ini needed)."""
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["engine"] = engine
    return config


def migrate(engine: Engine) -> None:
    """Bring the schema up to date (idempotent)."""
    command.upgrade(alembic_config(engine), "head")
