"""kill -9 at any moment loses nothing that was acknowledged, and duplicates nothing."""

from __future__ import annotations

import hashlib
import threading
from collections import Counter
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import Engine, create_engine, text

from tests.helpers.data import dataset_bytes, make_study
from tests.helpers.net import wait_until
from tests.helpers.nodes import (
    SPOOLINGS,
    NodeProcess,
    node_process,
    spooled_copies,
    wait_uploaded,
)
from tests.helpers.peers import status_peer
from tests.helpers.scu import send_files

pytestmark = [pytest.mark.integration, pytest.mark.slow]

INSTANCES = 300
KILL_AFTER = 100


def _send_and_kill9(node: NodeProcess, files: list[Path], kill_after: int) -> list[str]:
    """Send *files* on one association and kill -9 the node once *kill_after* of them
    are acknowledged, while the sender keeps going (the kill lands mid-PDU, mid-fsync or
    mid-commit); the SOP Instance UIDs that got Success."""
    acknowledged: list[str] = []
    lock = threading.Lock()

    def record(_index: int, uid: str, status: int) -> None:
        if status == 0:
            with lock:
                acknowledged.append(uid)

    def killer() -> None:
        wait_until(lambda: len(acknowledged) >= kill_after, 60, interval=0.001)
        node.kill9()

    thread = threading.Thread(target=killer)
    thread.start()
    report = send_files(node.port, files, on_response=record)
    thread.join()
    assert report.error is not None, "the association must have been cut by the kill"
    assert kill_after <= len(acknowledged) < len(files)
    return acknowledged


@pytest.mark.parametrize("spooling", ["index", "files"])
@pytest.mark.parametrize("store_up_before_kill", [True, False], ids=["store-up", "store-down"])
def test_kill_9_mid_association_then_restart_keeps_every_acknowledged_instance(
    tmp_path: Path, database_url: str, store_up_before_kill: bool, spooling: str
) -> None:
    files = make_study(tmp_path / "study", INSTANCES)
    expected_sha = {}
    for path in files:
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        expected_sha[uid] = hashlib.sha256(dataset_bytes(path)).hexdigest()
    root = tmp_path / "node"
    root.mkdir()
    objects = root / "objects"
    if not store_up_before_kill:
        objects.write_text("blocks the object store until the restart")

    with node_process(root, database_url, storage=SPOOLINGS[spooling]) as node:
        acknowledged = _send_and_kill9(node, files, KILL_AFTER)

        if objects.is_file():
            objects.unlink()
        node.start()

        engine = create_engine(database_url)
        try:
            wait_uploaded(engine, len(acknowledged), timeout=60)
            with engine.connect() as connection:
                rows = connection.execute(
                    text("SELECT sop_instance_uid, sha256, object_key, state, is_current"
                         " FROM instance")
                ).all()
        finally:
            engine.dispose()

    by_uid: dict[str, list[tuple[str, str, str, bool]]] = {}
    for uid, sha, key, state, current in rows:
        by_uid.setdefault(uid, []).append((sha, key, state, bool(current)))
    missing = [uid for uid in acknowledged if uid not in by_uid]
    assert not missing, f"{len(missing)} acknowledged instances lost"
    duplicated = {uid: versions for uid, versions in by_uid.items() if len(versions) != 1}
    assert not duplicated, "no instance may be recorded twice"
    # At most the one instance in flight at the kill is present without an ack.
    assert len(by_uid) - len(acknowledged) <= 1
    for uid in acknowledged:
        ((sha, key, state, current),) = by_uid[uid]
        assert state == "stored" and current
        assert sha == expected_sha[uid]
        stored = root / "objects" / key
        assert hashlib.sha256(dataset_bytes(stored)).hexdigest() == expected_sha[uid]
    assert list((root / "spool" / "incoming").iterdir()) == []
    engine = create_engine(database_url)
    try:
        wait_until(lambda: spooled_copies(engine, root / "spool") == (0, 0), 10,
                   message="the spool to be emptied")
    finally:
        engine.dispose()


ROUTED_INSTANCES = 150
ROUTED_KILL_AFTER = 50


def test_kill_9_mid_association_leaves_every_acknowledged_instance_with_its_forward_jobs(
    tmp_path: Path, database_url: str
) -> None:
    # The transactional outbox: an instance and its forwarding jobs are committed
    # together, before Success is sent, so a kill at any moment leaves no acknowledged
    # instance without one job per routed destination (and no job twice).
    files = make_study(tmp_path / "study", ROUTED_INSTANCES)
    with (status_peer(tmp_path / "pacs", ae_title="PACS") as pacs,
          status_peer(tmp_path / "vna", ae_title="VNA") as vna):
        sections = {
            "destination": [
                {"name": peer.ae_title.lower(), "ae_title": peer.ae_title, "host": "127.0.0.1",
                 "port": peer.port, "timeout": 5.0,
                 "retry": {"initial_seconds": 0.2, "max_seconds": 1.0}}
                for peer in (pacs, vna)
            ],
            "route": [{"name": "all", "destinations": ["pacs", "vna"]}],
        }
        with node_process(tmp_path / "node", database_url, **sections) as node:
            acknowledged = _send_and_kill9(node, files, ROUTED_KILL_AFTER)

            engine = create_engine(database_url)
            try:
                at_the_kill = _obligations(engine)  # as the kill left them
                node.start()
                for peer in (pacs, vna):
                    wait_until(lambda peer=peer: set(acknowledged) <= set(peer.stored()), 60,
                               message=f"every acknowledged instance at {peer.ae_title}")
                wait_until(lambda: _job_states(engine) == {"done": 2 * len(at_the_kill)}, 60,
                           message="every job done")
                after_restart = _obligations(engine)
            finally:
                engine.dispose()

    missing = [uid for uid in acknowledged if uid not in at_the_kill]
    assert not missing, f"{len(missing)} acknowledged instances have no index row or jobs"
    # Every recorded instance, acknowledged or the one caught mid-commit, has exactly its
    # obligations: one job per routed destination.
    assert all(jobs == {"pacs": 1, "vna": 1} for jobs in at_the_kill.values()), at_the_kill
    assert after_restart == at_the_kill, "the restart neither lost nor duplicated a job"


def _obligations(engine: Engine) -> dict[str, Counter[str]]:
    """SOP Instance UID -> forward jobs per destination, for every recorded instance."""
    with engine.connect() as connection:
        rows = connection.execute(text(
            "SELECT i.sop_instance_uid, j.destination FROM instance i"
            " LEFT JOIN forward_job j ON j.instance_pk = i.id")).all()
    obligations: dict[str, Counter[str]] = {}
    for uid, destination in rows:
        jobs = obligations.setdefault(uid, Counter())
        if destination is not None:
            jobs[destination] += 1
    return obligations


def _job_states(engine: Engine) -> dict[str, int]:
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT state, count(*) FROM forward_job GROUP BY state"))
        return {row[0]: row[1] for row in rows}
