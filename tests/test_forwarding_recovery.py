"""Forwarding survives kill -9, and workers of several processes never double-claim."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from gateway.config import DestinationConfig
from gateway.forwarder import Forwarder, ForwardSettings
from gateway.index import queue
from gateway.index.database import make_engine
from gateway.index.outbox import Outcome
from gateway.node import Node
from gateway.objectstore.filestore import FileObjectStore
from gateway.spool import Spool
from tests.helpers import dcmtk
from tests.helpers.data import make_study
from tests.helpers.net import free_port, wait_until
from tests.helpers.nodes import make_config, node_process, running_node, wait_uploaded
from tests.helpers.peers import status_peer
from tests.helpers.scu import send_files

pytestmark = [pytest.mark.integration]


def _destination(port: int, **extra: object) -> dict[str, object]:
    return {"name": "pacs", "ae_title": "PEER", "host": "127.0.0.1", "port": port,
            "timeout": 5.0, "retry": {"initial_seconds": 0.2, "max_seconds": 1.0}, **extra}


@pytest.mark.slow
def test_kill_9_while_forwarding_then_restart_delivers_everything(
    tmp_path: Path, database_url: str
) -> None:
    files = make_study(tmp_path / "study", 40)
    with status_peer(tmp_path / "peer", delay=0.05) as peer:
        sections = {"destination": [_destination(peer.port, batch_size=10)],
                    "route": [{"name": "all", "destinations": ["pacs"]}]}
        with node_process(tmp_path / "node", database_url, **sections) as node:
            report = send_files(node.port, files)
            assert [status for _, status in report.statuses] == [0] * 40
            wait_until(lambda: len(peer.stored()) >= 10, 30, message="forwarding under way")
            node.kill9()
            delivered_before = len(peer.stored())
            assert delivered_before < 40, "the kill must land mid-forward"
            node.start()
            wait_until(lambda: len(peer.stored()) == 40, 60, message="all 40 delivered")
            engine = create_engine(database_url)
            try:
                wait_until(lambda: _states(engine) == {"done": 40}, 30)
            finally:
                engine.dispose()
    # Resending what was delivered but not yet recorded is allowed; losing is not.
    assert set(peer.stored()) == {uid for uid, _ in report.statuses}


def _states(engine: object) -> dict[str, int]:
    with engine.connect() as connection:  # type: ignore[attr-defined]
        rows = connection.execute(text("SELECT state, count(*) FROM forward_job GROUP BY state"))
        return {row[0]: row[1] for row in rows}


def test_workers_of_two_gateway_processes_never_send_the_same_job_twice(
    tmp_path: Path, database_url: str
) -> None:
    port = free_port()  # the destination is down while the jobs pile up
    destination = _destination(port, max_associations=2, batch_size=3)
    config = make_config(
        tmp_path, database_url, destination=[destination],
        route=[{"name": "all", "destinations": ["pacs"]}],
    )
    files = make_study(tmp_path / "study", 30)
    with running_node(config) as node:
        assert dcmtk.storescu(node.receiver.port, files).ok
        wait_uploaded(node.engine, 30)
        # A second "process" on the same database and object store, with its own spool.
        engine = make_engine(database_url)
        other = Forwarder(
            [DestinationConfig.model_validate(destination)],
            ForwardSettings(
                engine=engine,
                spool=Spool(tmp_path / "other-spool"),
                store=FileObjectStore(tmp_path / "objects"),
                node_name="node-other",
                calling_ae_title="GATEWAY2",
            ),
        )
        other.start()
        try:
            with status_peer(tmp_path / "peer", port=port, delay=0.02) as peer:
                node.forwarder.wake()
                other.wake()
                wait_until(lambda: _states(node.engine).get("done", 0) == 30, 60)
                counts = peer.stored()
                senders = _callers(node.engine)
        finally:
            other.stop()
            engine.dispose()
    assert len(counts) == 30
    assert set(counts.values()) == {1}, "no job may be delivered twice"
    assert len(senders) == 2, "both processes took part"


def _callers(engine: object) -> set[str]:
    with engine.connect() as connection:  # type: ignore[attr-defined]
        rows = connection.execute(
            text("SELECT DISTINCT node FROM forward_attempt WHERE outcome = 'success'")
        )
        return {row[0] for row in rows}


@contextmanager
def _pending_jobs(tmp_path: Path, database_url: str, count: int) -> Iterator[Node]:
    """A node whose forwarder is stopped, with *count* instances stored and their jobs
    for destination ``pacs`` pending and untried."""
    config = make_config(tmp_path, database_url, destination=[_destination(free_port())],
                         route=[{"name": "all", "destinations": ["pacs"]}])
    with running_node(config) as node:
        node.forwarder.stop()
        assert dcmtk.storescu(node.receiver.port, make_study(tmp_path / "s", count)).ok
        wait_uploaded(node.engine, count)
        with node.engine.begin() as connection:
            connection.execute(text("UPDATE forward_job SET state = 'pending', lease_owner = NULL,"
                                    " next_attempt_at = NULL, attempts = 0"))
        yield node


def test_concurrent_claims_split_the_queue(tmp_path: Path, database_url: str) -> None:
    """Two claimers racing on one destination get disjoint batches."""
    with _pending_jobs(tmp_path, database_url, 40) as node:
        claimed: dict[str, list[int]] = {}
        barrier = threading.Barrier(4)

        def claim(owner: str) -> None:
            barrier.wait()
            ids: list[int] = []
            while True:
                with node.engine.begin() as connection:
                    batch = queue.claim_batch(
                        connection, "pacs", node=owner, owner=owner,
                        now=node.ingestor.clock(), lease=dt.timedelta(seconds=60),
                        limit=3,
                    )
                if not batch:
                    break
                ids.extend(job.id for job in batch)
                time.sleep(0.005)  # let the others in, as real work between claims would
            claimed[owner] = ids

        threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    all_ids = [job_id for ids in claimed.values() for job_id in ids]
    assert len(all_ids) == 40
    assert len(set(all_ids)) == 40, "a job was claimed by two workers"


def test_outcomes_recorded_together_are_recorded_as_one_by_one_and_lost_leases_kept(
    tmp_path: Path, database_url: str
) -> None:
    """The forwarder records an association's deliveries in one go: each job moves on as
    its outcome says, with its attempt row; a job whose lease another worker took
    meanwhile is left as that worker has it, and reported."""
    with _pending_jobs(tmp_path, database_url, 5) as node:
        now = node.ingestor.clock()
        with node.engine.begin() as connection:
            jobs = queue.claim_batch(connection, "pacs", node="n", owner="n:w", now=now,
                                     lease=dt.timedelta(seconds=60), limit=5)
        assert len(jobs) == 5
        retry_at = now + dt.timedelta(seconds=30)
        outcomes = [
            Outcome("success", status=0x0000),
            Outcome("warning", status=0xB000, error="coercion of data elements"),
            Outcome("transient", status=None, error="connection refused",
                    next_attempt_at=retry_at),
            Outcome("permanent", status=0xA900, error="refused", dead_reason="refused: 0xA900"),
            Outcome("success", status=0x0000),
        ]
        stolen = jobs[4].id
        with node.engine.begin() as connection:
            connection.execute(text("UPDATE forward_job SET lease_owner = 'm:w' WHERE id = :id"),
                               {"id": stolen})
        with node.engine.begin() as connection:
            lost = queue.record_outcomes(
                connection, [(job.id, job.attempts + 1, outcome)
                             for job, outcome in zip(jobs, outcomes, strict=True)],
                owner="n:w", now=now, forward_association_id="assoc-1")
        assert lost == [stolen]
        with node.engine.connect() as connection:
            rows = {row.id: row for row in connection.execute(text(
                "SELECT id, state, attempts, lease_owner, last_status, last_error, warning,"
                " dead_reason, next_attempt_at IS NOT NULL AS retries FROM forward_job"))}
            attempts = connection.execute(text(
                "SELECT job_pk, outcome, status, error, forward_association_id, node"
                " FROM forward_attempt ORDER BY job_pk")).all()
    expected = [
        ("done", 1, None, 0x0000, None, None, None, False),
        ("done", 1, None, 0xB000, "coercion of data elements", "coercion of data elements",
         None, False),
        ("pending", 1, None, None, "connection refused", None, None, True),
        ("dead", 1, None, 0xA900, "refused", None, "refused: 0xA900", False),
        ("in_flight", 0, "m:w", None, None, None, None, False),
    ]
    for job, want in zip(jobs, expected, strict=True):
        row = rows[job.id]
        assert (row.state, row.attempts, row.lease_owner, row.last_status, row.last_error,
                row.warning, row.dead_reason, bool(row.retries)) == want, job.id
    assert [tuple(a) for a in attempts if a.forward_association_id == "assoc-1"] == [
        (job.id, outcome.outcome, outcome.status, outcome.error, "assoc-1", "n")
        for job, outcome in zip(jobs[:4], outcomes[:4], strict=True)
    ]
