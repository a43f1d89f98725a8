"""Start-up recovery and the edges of the durability promise."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text

from gateway.index import repository
from gateway.index.repository import AssociationFacts
from gateway.node import Node, StartupError
from gateway.receiver import _Session
from gateway.status import Status
from tests.helpers.data import dataset_bytes, make_study
from tests.helpers.faults import lose_connection_after_commit
from tests.helpers.net import wait_until
from tests.helpers.nodes import (
    FILE_SPOOL,
    SPOOLINGS,
    make_config,
    running_node,
    spooled_copies,
    wait_uploaded,
)
from tests.helpers.scu import send_files

pytestmark = pytest.mark.integration


def _count(node: Node, sql: str) -> int:
    with node.engine.connect() as connection:
        return int(connection.execute(text(sql)).scalar_one())


def test_unreferenced_spool_files_are_set_aside_not_deleted(
    tmp_path: Path, database_url: str
) -> None:
    config = make_config(tmp_path, database_url)
    with running_node(config):
        pass
    stray = tmp_path / "spool" / "ready" / "0123456789abcdef0123456789abcdef.dcm"
    stray.write_bytes(b"bytes no index row points to")
    with running_node(config) as node:
        assert not stray.exists()
        kept = node.spool.orphaned / stray.name
        assert kept.read_bytes() == b"bytes no index row points to"


def test_node_identity_survives_restarts_and_an_empty_one_stops_the_start(
    tmp_path: Path, database_url: str
) -> None:
    config = make_config(tmp_path, database_url)
    with running_node(config) as node:
        first = node.name
    with running_node(config) as node:
        assert node.name == first
    (tmp_path / "spool" / "node-id").write_text("")
    with pytest.raises(StartupError, match="node-id is empty"):
        Node(config)


@pytest.mark.parametrize("spooling", ["index", "files"])
def test_a_commit_that_fails_after_reaching_the_database_loses_nothing(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch, spooling: str
) -> None:
    """The COMMIT is applied but the client sees an error: the sender gets 0xA700 and
    re-sends; the instance must end up stored once, with its bytes."""
    lose_connection_after_commit(
        monkeypatch, lambda stack: "ingest.py" in stack and "in _commit" in stack
    )
    config = make_config(tmp_path, database_url, storage=SPOOLINGS[spooling])
    files = make_study(tmp_path / "study", 1)
    with running_node(config) as node:
        first = send_files(node.receiver.port, files)
        assert first.statuses[0][1] == Status.OUT_OF_RESOURCES
        second = send_files(node.receiver.port, files)
        assert second.statuses[0][1] == Status.SUCCESS
        wait_uploaded(node.engine, 1)
        assert _count(node, "SELECT count(*) FROM instance") == 1
        # The spool file goes right after the row records the object.
        wait_until(lambda: list(node.spool.ready.iterdir()) == [], 10,
                   message="the uploaded spool files deleted")


@pytest.mark.parametrize("resent_to", ["files", "index"])
def test_a_resend_restores_a_spooled_instance_whose_file_went_missing(
    tmp_path: Path, database_url: str, resent_to: str
) -> None:
    # Content spooled in the index commits with its row and cannot go missing; a spool
    # file can. The copy sent again takes its place, as a file or (a node now spooling
    # small instances in the index) in the index.
    objects = tmp_path / "objects"
    objects.write_text("store unavailable, so the instance stays in the spool")
    files = make_study(tmp_path / "study", 1)
    with running_node(make_config(tmp_path, database_url, storage=FILE_SPOOL)) as node:
        assert send_files(node.receiver.port, files).statuses[0][1] == 0
        (lost,) = node.spool.ready.iterdir()
        lost.unlink()
    config = make_config(tmp_path, database_url, storage=SPOOLINGS[resent_to])
    with running_node(config) as node:
        assert send_files(node.receiver.port, files).statuses[0][1] == 0
        restored = spooled_copies(node.engine, node.spool.root)
        assert restored == ((0, 1) if resent_to == "files" else (1, 0))
        objects.unlink()
        wait_uploaded(node.engine, 1)
        assert _count(node, "SELECT count(*) FROM instance") == 1
        with node.engine.connect() as connection:
            key = connection.execute(text("SELECT object_key FROM instance")).scalar_one()
        assert dataset_bytes(objects / key) == dataset_bytes(files[0])


class _DeadAssociation:
    """Stands in for a pynetdicom association whose thread died (nothing else to do)."""

    dimse = None

    def is_alive(self) -> bool:
        return False


def test_sessions_of_dead_association_threads_are_closed(node: Node) -> None:
    facts = AssociationFacts(
        "dead-1", node.name, "CT01", "GATEWAY", "127.0.0.1", 1, node.ingestor.clock()
    )
    session = _Session(facts)
    with node.engine.begin() as connection:
        repository.insert_association(connection, facts, "established")
    session.recorded = True
    node.receiver._sessions[_DeadAssociation()] = session
    assert node.receiver.reap() == 1
    wait_until(
        lambda: _count(node, "SELECT count(*) FROM association WHERE outcome = 'aborted'") == 1, 5
    )


def test_a_resend_to_another_node_leaves_the_spooled_instance_to_its_node(
    tmp_path: Path, database_url: str
) -> None:
    # Two nodes on one index: the instance waits in node A's spool (its store is down);
    # the same bytes sent to node B are a duplicate there. B does not find A's file in
    # its own spool, and must not take A's row over as if the file were lost.
    objects = tmp_path / "objects"
    objects.write_text("store unavailable")
    files = make_study(tmp_path / "study", 1)
    storage = {**FILE_SPOOL, "object_store": f"file://{objects}"}
    node_a = make_config(tmp_path / "a", database_url, storage=storage)
    node_b = make_config(tmp_path / "b", database_url, storage=storage)
    with running_node(node_a) as a, running_node(node_b) as b:
        assert send_files(a.receiver.port, files).statuses[0][1] == 0
        assert send_files(b.receiver.port, files).statuses[0][1] == 0
        with a.engine.connect() as connection:
            row = connection.execute(text(
                "SELECT received_by, spool_name FROM instance")).one()
        assert row.received_by == a.name
        assert (a.spool.ready / row.spool_name).exists()
        assert list(b.spool.ready.iterdir()) == []
        objects.unlink()
        wait_uploaded(a.engine, 1)
