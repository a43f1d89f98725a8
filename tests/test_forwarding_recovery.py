"""Forwarding survives kill -9, and workers of several processes never double-claim."""

from __future__ import annotations

import datetime as dt
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from gateway.config import DestinationConfig
from gateway.forwarder import Forwarder, ForwardSettings
from gateway.index import queue
from gateway.index.database import make_engine
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


def test_concurrent_claims_split_the_queue(tmp_path: Path, database_url: str) -> None:
    """Two claimers racing on one destination get disjoint batches."""
    config = make_config(tmp_path, database_url, destination=[_destination(free_port())],
                         route=[{"name": "all", "destinations": ["pacs"]}])
    with running_node(config) as node:
        node.forwarder.stop()
        assert dcmtk.storescu(node.receiver.port, make_study(tmp_path / "s", 40)).ok
        wait_uploaded(node.engine, 40)
        with node.engine.begin() as connection:
            connection.execute(text("UPDATE forward_job SET state = 'pending', lease_owner = NULL,"
                                    " next_attempt_at = NULL, attempts = 0"))
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
