"""The three receivers measured side by side, each started fresh in its own run directory.

- ``gateway``: ``dicom-gateway run`` in its production shape (durable spool, SQL index,
  ``file://`` object store, routing rules evaluated, study events to a file sink);
- ``orthanc``: Debian's Orthanc with a temporary config (SQLite index, no compression);
- ``storescp``: DCMTK's storescp writing files bit-preserving, no index (the practical limit).

Each is a context manager that stops the process group however the block ends.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, text

from bench.processes import (
    LOOPBACK,
    BenchError,
    Server,
    dcmtk_env,
    free_port,
    start_server,
    wait_until,
)

GATEWAY_AE = "GATEWAY"
ORTHANC_AE = "ORTHANC"
STORESCP_AE = "STORESCP"
DESTINATION_AE = "DEST"
INGEST_CALLING_AE = "BENCHSCU"
ROUTE_CALLING_AE = "ROUTESCU"
STORESCP = "/usr/bin/storescp"
ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
# BENCH_GATEWAY: another gateway executable to measure (default: this checkout's).
GATEWAY = os.environ.get("BENCH_GATEWAY") or str(Path(sys.executable).parent / "dicom-gateway")


@dataclass
class Target:
    """A running receiver: where to send, and how many instances it holds."""

    name: str
    ae_title: str
    port: int
    server: Server

    def count(self) -> int:
        raise NotImplementedError

    def peak_rss(self) -> tuple[int, int]:
        return self.server.peak_rss()


# --- gateway -----------------------------------------------------------------------------


def gateway_config(run_dir: Path, port: int, destination_port: int, database: str) -> str:
    """The production-shaped configuration; ROUTESCU's instances go to the destination,
    everything else is evaluated by the same rule and recorded as unrouted."""
    return f"""\
[node]
ae_title = "{GATEWAY_AE}"
host = "{LOOPBACK}"
port = {port}

[storage]
spool_dir = "{run_dir / 'spool'}"
object_store = "file://{run_dir / 'objects'}"
database = "{database}"

[[calling_ae]]
ae_title = "{INGEST_CALLING_AE}"

[[calling_ae]]
ae_title = "{ROUTE_CALLING_AE}"

[[destination]]
name = "archive"
ae_title = "{DESTINATION_AE}"
host = "{LOOPBACK}"
port = {destination_port}

[[route]]
name = "bench-route"
destinations = ["archive"]
[route.match]
calling_ae = "{ROUTE_CALLING_AE}"

[events]

[[event_sink]]
name = "local"
type = "file"
path = "{run_dir / 'events.jsonl'}"

[logging]
format = "json"
level = "info"
"""


def sqlite_url(run_dir: Path) -> str:
    return f"sqlite:///{run_dir / 'index.db'}"


@dataclass
class Gateway(Target):
    database: str = ""
    _sqlite: sqlite3.Connection | None = field(default=None, repr=False)
    _engine: Engine | None = field(default=None, repr=False)

    def _scalar(self, query: str) -> int:
        if self.database.startswith("sqlite"):
            if self._sqlite is None:
                path = self.database.removeprefix("sqlite:///")
                self._sqlite = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
            return int(self._sqlite.execute(query).fetchone()[0])
        if self._engine is None:
            self._engine = create_engine(self.database, pool_size=1)
        with self._engine.connect() as connection:
            return int(connection.execute(text(query)).scalar_one())

    def count(self) -> int:
        """Current SOP instances in the index."""
        return self._scalar("SELECT count(*) FROM instance WHERE is_current")

    def uploaded(self) -> int:
        """Instances in the object store (uploaded from the spool)."""
        return self._scalar("SELECT count(*) FROM instance WHERE state = 'stored'")

    def forwarded(self) -> int:
        """Forward jobs completed (the destination answered the C-STORE)."""
        return self._scalar("SELECT count(*) FROM forward_job WHERE state = 'done'")

    def close(self) -> None:
        if self._sqlite is not None:
            self._sqlite.close()
            self._sqlite = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None


@contextmanager
def gateway(
    run_dir: Path, *, destination_port: int | None = None, database: str | None = None
) -> Iterator[Gateway]:
    """The gateway node on a free loopback port with a fresh spool, store and index."""
    run_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    database = database or sqlite_url(run_dir)
    config = run_dir / "gateway.toml"
    config.write_text(gateway_config(run_dir, port, destination_port or free_port(), database))
    log_path = run_dir / "gateway.log"
    server = start_server("gateway", [GATEWAY, "run", "--config", str(config)], log_path,
                          cwd=run_dir)
    node = Gateway("gateway", GATEWAY_AE, port, server, database=database)
    try:
        def started() -> bool:
            server.check_alive()
            return b'"node_started"' in log_path.read_bytes()

        wait_until(started, 120, "the gateway to log node_started")
        server.wait_listening(port)
        yield node
    finally:
        node.close()
        server.stop()


# --- orthanc -----------------------------------------------------------------------------


@dataclass
class Orthanc(Target):
    http_port: int = 0

    def request(self, path: str, body: Any = None, timeout: float = 60) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://{LOOPBACK}:{self.http_port}{path}", data=data,
            method="GET" if body is None else "POST",
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def count(self) -> int:
        return int(self.request("/statistics")["CountInstances"])


def orthanc_config(run_dir: Path, dicom_port: int, http_port: int,
                   destination_port: int | None) -> dict[str, Any]:
    """As in the test suite's Orthanc peer: SQLite index, no compression, TcpNoDelay."""
    config: dict[str, Any] = {
        "Name": "gateway-bench",
        "StorageDirectory": str(run_dir / "storage"),
        "IndexDirectory": str(run_dir / "index"),
        "StorageCompression": False,
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": ORTHANC_AE,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowEcho": True,
        "UnknownSopClassAccepted": True,
        "TcpNoDelay": True,
        "Plugins": [],
        "ConcurrentJobs": 2,
    }
    if destination_port is not None:
        config["DicomModalities"] = {"dest": [DESTINATION_AE, LOOPBACK, destination_port]}
    return config


@contextmanager
def orthanc(run_dir: Path, shim: dict[str, str], *,
            destination_port: int | None = None) -> Iterator[Orthanc]:
    """Orthanc on free loopback ports with a fresh storage and index directory."""
    run_dir.mkdir(parents=True, exist_ok=True)
    dicom_port, http_port = free_port(), free_port()
    config_path = run_dir / "orthanc.json"
    config_path.write_text(json.dumps(
        orthanc_config(run_dir, dicom_port, http_port, destination_port), indent=1))
    server = start_server("orthanc", [ORTHANC, str(config_path)], run_dir / "orthanc.log",
                          env=dcmtk_env(shim))
    target = Orthanc("orthanc", ORTHANC_AE, dicom_port, server, http_port=http_port)
    try:
        server.wait_listening(http_port)
        server.wait_listening(dicom_port)

        def answers() -> bool:
            try:
                target.request("/system", timeout=5)
            except OSError:
                server.check_alive()
                return False
            return True

        wait_until(answers, 60, "Orthanc's REST API")
        yield target
    finally:
        server.stop()


# --- storescp ----------------------------------------------------------------------------


@dataclass
class StoreSCP(Target):
    directory: Path = Path()

    def count(self) -> int:
        # The route measurement polls this every 10 ms while the gateway works: scandir's
        # file types cost no stat per entry (0.08 ms for 300 files, 0.7 ms with a stat).
        with os.scandir(self.directory) as entries:
            return sum(1 for entry in entries if entry.is_file(follow_symlinks=False))


@contextmanager
def storescp(directory: Path, shim: dict[str, str], *, ae_title: str = STORESCP_AE,
             log_path: Path | None = None, fork: bool = False) -> Iterator[StoreSCP]:
    """DCMTK storescp writing bit-preserving files into *directory*: one association at a
    time, or with *fork* a child process per association (as a PACS serves several)."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    mode = ["--fork"] if fork else []
    server = start_server(
        ae_title.lower(),
        [STORESCP, *mode, "+B", "-dhl", "-aet", ae_title, "-od", str(directory), "+xa",
         str(port)],
        log_path or directory.parent / f"storescp-{ae_title.lower()}.log",
        env=dcmtk_env(shim),
    )
    try:
        server.wait_listening(port)
        yield StoreSCP("storescp", ae_title, port, server, directory=directory)
    finally:
        server.stop()


def require_tools() -> None:
    """Fail early, with the fix, when a peer is missing."""
    missing = [tool for tool in (STORESCP, "/usr/bin/storescu", ORTHANC, GATEWAY)
               if not Path(tool).exists()]
    if missing:
        raise BenchError(f"missing: {', '.join(missing)} (run `make test-setup`)")
