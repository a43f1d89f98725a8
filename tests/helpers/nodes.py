"""Running gateway nodes in tests: in-process for inspection, subprocess for kill -9."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, text

from gateway.config import GatewayConfig
from gateway.node import Node
from tests.helpers.net import free_port, wait_for_port, wait_until
from tests.helpers.procs import child_pids

TEST_CALLING_AES = ("STORESCU", "MODALITY", "CT01", "ECHOSCU")
FILE_SPOOL: dict[str, Any] = {"spool_in_index_max_bytes": 0}
"""``[storage]`` settings that spool every instance as a file (by default the tests'
small instances are spooled in the index)."""
SPOOLINGS: dict[str, dict[str, Any]] = {"index": {}, "files": FILE_SPOOL}
"""The two ways an instance waits for the object store, for tests of both."""


def config_data(
    root: Path, database_url: str, *, port: int = 0, **sections: dict[str, Any]
) -> dict[str, Any]:
    """A test configuration as plain data; *sections* are merged over the defaults."""
    data: dict[str, Any] = {
        "node": {
            "ae_title": "GATEWAY",
            "host": "127.0.0.1",
            "port": port,
            "stop_timeout": 5.0,
        },
        "storage": {
            "spool_dir": str(root / "spool"),
            "object_store": f"file://{root / 'objects'}",
            "database": database_url,
            "min_free_bytes": 0,
            "upload_retry": {"initial_seconds": 0.2, "max_seconds": 1.0},
        },
        "calling_ae": [{"ae_title": ae} for ae in TEST_CALLING_AES],
        "logging": {"format": "json", "level": "info"},
    }
    for name, values in sections.items():
        if isinstance(values, dict) and isinstance(data.get(name), dict):
            data[name] = {**data[name], **values}
        else:
            data[name] = values
    return data


def make_config(root: Path, database_url: str, **sections: dict[str, Any]) -> GatewayConfig:
    """A configuration for an in-process node: its background work runs as threads, so
    tests can drive the uploader, forwarder and watcher directly (``node_process`` runs
    the production default, a worker process)."""
    data = config_data(root, database_url, **sections)
    data["node"].setdefault("worker_process", False)
    return GatewayConfig.model_validate(data)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(data: dict[str, Any]) -> str:
    """A small TOML writer for test configurations (tables and arrays of tables)."""
    lines: list[str] = []

    def table(prefix: str, values: dict[str, Any], header: str) -> None:
        scalars = {k: v for k, v in values.items() if not isinstance(v, dict)
                   and not (isinstance(v, list) and v and isinstance(v[0], dict))}
        lines.append(header)
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in scalars.items())
        lines.append("")
        for key, value in values.items():
            if isinstance(value, dict):
                table(f"{prefix}{key}.", value, f"[{prefix}{key}]")
            elif isinstance(value, list) and value and isinstance(value[0], dict):
                for item in value:
                    table(f"{prefix}{key}.", item, f"[[{prefix}{key}]]")

    for key, value in data.items():
        if isinstance(value, dict):
            table(f"{key}.", value, f"[{key}]")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for item in value:
                table(f"{key}.", item, f"[[{key}]]")
        else:
            lines.insert(0, f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


@contextmanager
def running_node(config: GatewayConfig, config_path: Path | None = None) -> Iterator[Node]:
    """An in-process node, stopped at the end of the block."""
    node = Node(config, config_path)
    node.start()
    try:
        yield node
    finally:
        node.stop()


def spooled_copies(engine: Engine, spool_dir: Path) -> tuple[int, int]:
    """Instances waiting for the object store: (spooled in the index, files in ready/)."""
    with engine.connect() as connection:
        in_index = connection.execute(text("SELECT count(*) FROM spooled_content")).scalar_one()
    return int(in_index), len(list((spool_dir / "ready").iterdir()))


def wait_uploaded(engine: Engine, count: int, timeout: float = 30.0) -> None:
    """Wait until *count* instance rows are in the object store."""

    def done() -> bool:
        with engine.connect() as connection:
            stored = connection.execute(
                text("SELECT count(*) FROM instance WHERE state = 'stored'")
            ).scalar_one()
        return int(stored) >= count

    wait_until(done, timeout, message=f"{count} uploads")


@dataclass
class NodeProcess:
    """``dicom-gateway run`` as a child process."""

    config_path: Path
    port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)
    start_new_session: bool = False

    def start(self, timeout: float = 60.0) -> None:
        """Start the node and return once it has logged ``node_started``: every
        listener (DICOM, HL7, HTTP) is then open."""
        started_before = self._started_count()
        log = self.log_path.open("ab")
        env = {**os.environ, **self.env}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "--config", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=self.start_new_session,
        )
        log.close()
        process = self.process
        try:
            wait_for_port(self.port, timeout)
            wait_until(
                lambda: self._started_count() > started_before or process.poll() is not None,
                timeout, message="node_started",
            )
            assert process.poll() is None, f"the node exited with {process.returncode}"
        except BaseException:
            self.stop()  # a node that did not start in time must not outlive the test
            raise

    def _started_count(self) -> int:
        if not self.log_path.exists():
            return 0
        return sum(1 for event in self.log_events() if event.get("event") == "node_started")

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def kill9(self) -> None:
        self.signal(signal.SIGKILL)
        self.wait()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return events

    def children(self) -> list[int]:
        """The node's child processes (its worker process)."""
        assert self.process is not None
        return child_pids(self.process.pid)

    def worker_pid(self, timeout: float = 30.0) -> int:
        found: list[int] = []
        wait_until(lambda: bool(found.extend(self.children()) or found), timeout,
                   message="the worker process")
        return found[0]

    def peak_rss_kib(self) -> int:
        """Peak resident memory of the node: its processes' peaks added up."""
        assert self.process is not None
        return sum(_peak_rss_kib(pid) for pid in [self.process.pid, *self.children()])


def _peak_rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@contextmanager
def node_process(
    root: Path, database_url: str, **sections: dict[str, Any]
) -> Iterator[NodeProcess]:
    """A subprocess node on a free port with the test configuration."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    data = config_data(root, database_url, port=port, **sections)
    config_path = root / "gateway.toml"
    config_path.write_text(to_toml(data))
    node = NodeProcess(config_path, port, root / "node.log")
    node.start()
    try:
        yield node
    finally:
        node.stop()


def engine_for(url: str) -> Engine:
    return create_engine(url)


def elapsed_since(start: float) -> float:
    return time.monotonic() - start


def event_time(events: list[dict[str, Any]], name: str) -> dt.datetime:
    """When the node logged the first *name* event (JSON log lines)."""
    return dt.datetime.fromisoformat(next(e for e in events if e["event"] == name)["timestamp"])
