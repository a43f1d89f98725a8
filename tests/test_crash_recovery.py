"""kill -9 at any moment loses nothing that was acknowledged, and duplicates nothing."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import create_engine, text

from tests.helpers.data import dataset_bytes, make_study
from tests.helpers.net import wait_until
from tests.helpers.nodes import node_process, wait_uploaded
from tests.helpers.scu import send_files

pytestmark = [pytest.mark.integration, pytest.mark.slow]

INSTANCES = 300
KILL_AFTER = 100


@pytest.mark.parametrize("store_up_before_kill", [True, False], ids=["store-up", "store-down"])
def test_kill_9_mid_association_then_restart_keeps_every_acknowledged_instance(
    tmp_path: Path, database_url: str, store_up_before_kill: bool
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

    with node_process(root, database_url) as node:
        acknowledged: list[str] = []
        lock = threading.Lock()

        def record(_index: int, uid: str, status: int) -> None:
            if status == 0:
                with lock:
                    acknowledged.append(uid)

        def killer() -> None:
            wait_until(lambda: len(acknowledged) >= KILL_AFTER, 60, interval=0.001)
            node.kill9()  # while the SCU keeps sending: lands mid-PDU, mid-fsync or mid-commit

        thread = threading.Thread(target=killer)
        thread.start()
        report = send_files(node.port, files, on_response=record)
        thread.join()
        assert report.error is not None, "the association must have been cut by the kill"
        assert KILL_AFTER <= len(acknowledged) < INSTANCES

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
    wait_until(lambda: not any((root / "spool" / "ready").iterdir()), 10,
               message="the spool to be emptied")
