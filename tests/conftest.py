"""Shared fixtures: databases (SQLite and PostgreSQL), nodes and peers."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from gateway.config import GatewayConfig
from gateway.node import Node
from tests.helpers import dcmtk
from tests.helpers.admin_http import TcpProxy, tcp_proxy
from tests.helpers.net import closed_port
from tests.helpers.nodes import FILE_SPOOL, make_config, running_node

POSTGRES_ADMIN_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
_postgres_state: dict[str, bool] = {}


def postgres_available() -> bool:
    if "ok" not in _postgres_state:
        try:
            engine = create_engine(POSTGRES_ADMIN_URL, connect_args={"connect_timeout": 3})
            with engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            engine.dispose()
            _postgres_state["ok"] = True
        except Exception:
            _postgres_state["ok"] = False
    return _postgres_state["ok"]


@pytest.fixture(scope="session")
def postgres_admin() -> Iterator[Engine]:
    if not postgres_available():
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required in CI but not reachable at {POSTGRES_ADMIN_URL}")
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_ADMIN_URL}")
    engine = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    yield engine
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database of each supported kind."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'index.db'}"
        return
    admin: Engine = request.getfixturevalue("postgres_admin")
    name = f"gwtest_{uuid.uuid4().hex[:16]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(POSTGRES_ADMIN_URL).set(database=name)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def gateway_config(tmp_path: Path, database_url: str) -> GatewayConfig:
    return make_config(tmp_path, database_url)


@pytest.fixture
def node(gateway_config: GatewayConfig) -> Iterator[Node]:
    """A running in-process node on a free port, on each database."""
    with running_node(gateway_config) as running:
        yield running


@pytest.fixture
def down_port() -> Iterator[int]:
    """A destination port that refuses connections for the whole test."""
    with closed_port() as port:
        yield port


@pytest.fixture
def file_spool_node(tmp_path: Path, database_url: str) -> Iterator[Node]:
    """A running node that spools every instance as a file, even a small one (for tests
    of what happens to spool files and partial receptions)."""
    with running_node(make_config(tmp_path, database_url, storage=FILE_SPOOL)) as running:
        yield running


@pytest.fixture(scope="session", autouse=True)
def _dcmtk_installed() -> None:
    dcmtk.require()


@pytest.fixture
def proxied_postgres(postgres_admin: Engine) -> Iterator[tuple[str, TcpProxy]]:
    """A fresh PostgreSQL database reached through a proxy the test can cut."""
    name = f"gwtest_{uuid.uuid4().hex[:16]}"
    with postgres_admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(POSTGRES_ADMIN_URL)
    try:
        with tcp_proxy(url.port or 5432) as proxy:
            proxied = url.set(database=name, port=proxy.port)
            yield proxied.render_as_string(hide_password=False), proxy
    finally:
        with postgres_admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
