"""``dicom-gateway run`` as two processes: the listener and its supervised worker."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, text

from tests.helpers import dcmtk
from tests.helpers.admin_http import AdminClient, metric
from tests.helpers.data import make_study
from tests.helpers.dcmtk import StoreSCP
from tests.helpers.net import LOOPBACK, free_port, wait_until
from tests.helpers.nodes import NodeProcess, config_data, node_process, to_toml, wait_uploaded
from tests.test_admin_api import http_section

pytestmark = pytest.mark.integration


@contextmanager
def _routed_node(tmp_path: Path, database_url: str) -> Iterator[tuple[StoreSCP, NodeProcess, int]]:
    """A subprocess node routing everything to a storescp PACS, with its admin server
    on the returned port."""
    http_port = free_port()
    with dcmtk.storescp(tmp_path / "pacs") as pacs, node_process(
        tmp_path / "node", database_url,
        http=http_section(tmp_path, port=http_port),
        destination=[{"name": "pacs", "ae_title": "STORESCP", "host": LOOPBACK,
                      "port": pacs.port, "timeout": 10.0,
                      "retry": {"initial_seconds": 0.2, "max_seconds": 1.0}}],
        route=[{"name": "all", "destinations": ["pacs"]}],
    ) as node:
        yield pacs, node, http_port


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status


def _events(node: NodeProcess, name: str) -> list[dict[str, Any]]:
    return [event for event in node.log_events() if event.get("event") == name]


def test_the_worker_process_forwards_and_its_counters_are_on_the_listeners_metrics(
    tmp_path: Path, database_url: str
) -> None:
    files = make_study(tmp_path / "study", 5)
    with _routed_node(tmp_path, database_url) as (pacs, node, http_port):
        assert node.process is not None
        worker = node.worker_pid()
        assert worker != node.process.pid
        assert b"gateway.worker_process" in Path(f"/proc/{worker}/cmdline").read_bytes()
        assert dcmtk.storescu(node.port, files).ok
        wait_until(lambda: len(pacs.files()) == 5, 30, message="5 forwarded")
        engine = create_engine(database_url)
        try:
            wait_uploaded(engine, 5)
        finally:
            engine.dispose()
        api = AdminClient(http_port)
        samples = api.metrics()
        assert metric(samples, "dicom_gateway_instances_received_total",
                      calling_ae="STORESCU", outcome="stored") == 5
        wait_until(lambda: metric(api.metrics(), "dicom_gateway_forward_outcomes_total",
                                  destination="pacs", status_class="success") == 5, 10)
        assert metric(samples, "dicom_gateway_uploads_total", outcome="stored") == 5
        status, exposition = api.request("GET", "/metrics")
        assert status == 200
        names = [family.name for family in text_string_to_metric_families(exposition)]
        assert len(names) == len(set(names)), "each family once, listener and worker merged"
        forwarded = _events(node, "forward_association")
        assert forwarded and all(event["process"] == "worker" for event in forwarded)
        assert all("process" not in event for event in _events(node, "instance_stored"))


def test_a_killed_worker_is_restarted_and_catches_up(tmp_path: Path, database_url: str) -> None:
    first, second = make_study(tmp_path / "a", 3), make_study(tmp_path / "b", 4)
    with _routed_node(tmp_path, database_url) as (pacs, node, http_port):
        assert dcmtk.storescu(node.port, first).ok
        wait_until(lambda: len(pacs.files()) == 3, 30, message="first study forwarded")
        worker = node.worker_pid()
        os.kill(worker, signal.SIGKILL)
        # Receiving goes on while the worker is down: instances wait in the index.
        assert dcmtk.storescu(node.port, second).ok
        wait_until(lambda: bool(_events(node, "worker_process_exited")), 10)
        wait_until(lambda: [pid for pid in node.children() if pid != worker] != [], 30,
                   message="a new worker process")
        wait_until(lambda: len(pacs.files()) == 7, 30, message="second study forwarded")
        wait_until(lambda: AdminClient(http_port).request("GET", "/readyz")[0] == 200, 10)
        (exited,) = _events(node, "worker_process_exited")
        assert exited["exit_code"] == -signal.SIGKILL
        assert len(_events(node, "worker_process_started")) == 2


def test_pause_and_resume_reach_the_worker_process(tmp_path: Path, database_url: str) -> None:
    files = make_study(tmp_path / "study", 3)
    with _routed_node(tmp_path, database_url) as (pacs, node, http_port):
        node.worker_pid()
        api = AdminClient(http_port)
        api.post("/api/destinations/pacs/pause")
        assert dcmtk.storescu(node.port, files).ok
        time.sleep(1.5)
        assert pacs.files() == []
        (queue,) = api.get("/api/queues")
        assert queue["paused"] is True
        assert queue["pending"] == 3
        resumed_at = time.monotonic()
        api.post("/api/destinations/pacs/resume")
        wait_until(lambda: len(pacs.files()) == 3, 30, message="forwarded after resume")
        # Sooner than the worker's own periodic look at the pause flags (10 s).
        assert time.monotonic() - resumed_at < 8


def test_the_worker_dies_with_a_killed_listener(tmp_path: Path, database_url: str) -> None:
    with node_process(tmp_path / "node", database_url) as node:
        worker = node.worker_pid()
        node.kill9()
        wait_until(lambda: not _alive(worker), 5, message="the worker gone with the listener")
        # ...and a new node starts on the same spool at once (the spool lock is free).
        node.start()
        assert node.worker_pid() != worker


def test_threads_instead_of_a_worker_process(tmp_path: Path, database_url: str) -> None:
    files = make_study(tmp_path / "study", 2)
    with node_process(tmp_path / "node", database_url,
                      node={"worker_process": False}) as node:
        assert dcmtk.storescu(node.port, files).ok
        engine = create_engine(database_url)
        try:
            wait_uploaded(engine, 2)
            with engine.connect() as connection:
                assert connection.execute(text("SELECT count(*) FROM instance")).scalar_one() == 2
        finally:
            engine.dispose()
        assert node.children() == []


def test_sigterm_to_the_whole_process_group_is_one_orderly_stop(
    tmp_path: Path, database_url: str
) -> None:
    # A group kill (a supervisor without KillMode=mixed, a shell's kill -TERM -PGID)
    # reaches the worker too: the listener still decides, and stops it last.
    files = make_study(tmp_path / "study", 3)
    node = NodeProcess(tmp_path / "node.toml", free_port(), tmp_path / "node.log")

    node.config_path.write_text(to_toml(config_data(tmp_path / "node", database_url,
                                                    port=node.port)))
    node.start_new_session = True
    node.start()
    try:
        node.worker_pid()
        assert dcmtk.storescu(node.port, files).ok
        assert node.process is not None
        os.killpg(node.process.pid, signal.SIGTERM)
        assert node.wait(60) == 0
    finally:
        node.stop()
    names = [event["event"] for event in node.log_events()]
    assert "worker_process_exited" not in names
    assert names.index("worker_process_stopped") < names.index("node_stopped")


def test_receiving_does_not_wait_for_a_stalled_worker(tmp_path: Path, database_url: str) -> None:
    # The worker is frozen (SIGSTOP): it reads none of its messages. Every instance is
    # still acknowledged at full speed, /metrics answers with the listener's part, and
    # once the worker runs again it forwards everything.
    files = make_study(tmp_path / "study", 300)
    with _routed_node(tmp_path, database_url) as (pacs, node, http_port):
        worker = node.worker_pid()
        os.kill(worker, signal.SIGSTOP)
        try:
            assert dcmtk.storescu(node.port, files, timeout=120).ok
            started = time.monotonic()
            samples = AdminClient(http_port).metrics()
            assert time.monotonic() - started < 15
            assert metric(samples, "dicom_gateway_instances_received_total",
                          calling_ae="STORESCU", outcome="stored") == 300
        finally:
            os.kill(worker, signal.SIGCONT)
        wait_until(lambda: len(pacs.files()) == 300, 60, message="300 forwarded")
        assert node.worker_pid() == worker
        assert not _events(node, "worker_process_exited")


def test_a_worker_that_cannot_start_stops_the_node_start_with_the_reason(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The worker is a new interpreter: one that cannot import the gateway (a broken
    # installation) exits at once. The node does not start half-way without it.
    from gateway.config import GatewayConfig
    from gateway.node import Node, StartupError
    from tests.helpers.net import port_open

    broken = tmp_path / "broken" / "gateway"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('a broken installation')\n")
    port = free_port()
    data = config_data(tmp_path / "node", database_url, port=port)
    node = Node(GatewayConfig.model_validate(data))
    monkeypatch.chdir(broken.parent)  # python -m finds the package in its directory first
    started = time.monotonic()
    try:
        with pytest.raises(StartupError,
                           match="worker process did not start: it exited with status 1"):
            node.start()
        assert time.monotonic() - started < 30
        assert not port_open(port)
    finally:
        node.stop()
