"""Forwarding edge cases found in review: unreachable hosts, wide studies, versions,
configuration changes between runs, big endian, leftovers."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pynetdicom import AllStoragePresentationContexts
from sqlalchemy import text

from gateway.index import queue
from gateway.node import Node
from tests.helpers import dcmtk
from tests.helpers.data import make_study, new_uid, unique_copy
from tests.helpers.net import free_port, wait_until
from tests.helpers.nodes import make_config, running_node
from tests.helpers.peers import status_peer
from tests.helpers.scu import send_files

pytestmark = pytest.mark.integration


def _dest(name: str, port: int, host: str = "127.0.0.1", **extra: Any) -> dict[str, Any]:
    return {"name": name, "ae_title": "PEER", "host": host, "port": port, "timeout": 3.0,
            "retry": {"initial_seconds": 0.1, "max_seconds": 0.3, "max_attempts": 100}, **extra}


def _all_to(*names: str) -> list[dict[str, Any]]:
    return [{"name": "all", "destinations": list(names)}]


def _states(node: Node) -> dict[str, int]:
    with node.engine.connect() as connection:
        rows = connection.execute(text("SELECT state, count(*) FROM forward_job GROUP BY state"))
        return {row[0]: row[1] for row in rows}


def test_unresolvable_destination_host_is_retried_with_backoff_then_dead_lettered(
    tmp_path: Path, database_url: str
) -> None:
    dest = _dest("typo", 104, host="pacs.nonexistent.invalid",
                 retry={"initial_seconds": 0.1, "max_seconds": 0.2, "max_attempts": 3})
    config = make_config(tmp_path, database_url, destination=[dest], route=_all_to("typo"))
    with running_node(config) as node:
        assert dcmtk.storescu(node.receiver.port, make_study(tmp_path / "s", 1)).ok
        wait_until(lambda: _states(node).get("dead", 0) == 1, 30)
        with node.engine.connect() as connection:
            reason, attempts = connection.execute(
                text("SELECT dead_reason, attempts FROM forward_job")).one()
    assert attempts == 3
    assert "cannot reach" in reason


def test_a_study_needing_more_than_128_contexts_is_split_over_associations(
    tmp_path: Path, database_url: str
) -> None:
    # 70 SOP classes, each proposed as stored plus an uncompressed fallback: 140 contexts.
    classes = [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts][:70]
    files = make_study(tmp_path / "s", 70)
    for path, sop_class in zip(files, classes, strict=True):
        ds = dcmread(path)
        ds.SOPClassUID = sop_class
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.save_as(path)
    with status_peer(tmp_path / "peer") as peer:
        config = make_config(tmp_path, database_url, destination=[_dest("wide", peer.port)],
                             route=_all_to("wide"))
        with running_node(config) as node:
            report = send_files(node.receiver.port, files)
            assert all(status == 0 for _, status in report.statuses)
            wait_until(lambda: _states(node).get("done", 0) == 70, 60)
        assert len(peer.stored()) == 70


def test_a_version_that_is_no_longer_current_is_never_sent(
    tmp_path: Path, database_url: str
) -> None:
    config = make_config(tmp_path, database_url, destination=[_dest("pacs", free_port())],
                         route=_all_to("pacs"))
    (first,) = make_study(tmp_path / "v1", 1)
    second = tmp_path / "v2.dcm"
    ds = dcmread(first)
    ds.SeriesDescription = "corrected"
    ds.save_as(second)
    with running_node(config) as node:
        node.forwarder.stop()  # drive the queue by hand
        assert dcmtk.storescu(node.receiver.port, [first]).ok
        with node.engine.begin() as connection:  # v1's job is out being tried...
            connection.execute(text("UPDATE forward_job SET state = 'in_flight'"))
        assert dcmtk.storescu(node.receiver.port, [second]).ok
        with node.engine.begin() as connection:  # ...fails, and comes back for a retry
            connection.execute(text(
                "UPDATE forward_job SET state = 'pending' WHERE state = 'in_flight'"))
            claimed = queue.claim_batch(
                connection, "pacs", node=node.name, owner=f"{node.name}:t", now=dt.datetime.now(
                    dt.UTC), lease=dt.timedelta(seconds=60), limit=10)
        states = _states(node)
    assert [job.sop_instance_uid for job in claimed] == [str(ds.SOPInstanceUID)]
    assert states == {"in_flight": 1, "superseded": 1}


def test_route_morph_is_the_one_configured_when_the_instance_was_routed(
    tmp_path: Path, database_url: str
) -> None:
    port = free_port()
    routes = [{"name": "old-name", "destinations": ["pacs"],
               "morph": {"set": {"InstitutionName": "Morphed"}}}]
    config = make_config(tmp_path, database_url, destination=[_dest("pacs", port)], route=routes)
    with running_node(config) as node:
        assert dcmtk.storescu(node.receiver.port, make_study(tmp_path / "s", 1)).ok
    renamed = [{"name": "new-name", "destinations": ["pacs"]}]
    config = make_config(tmp_path, database_url, destination=[_dest("pacs", port)], route=renamed)
    with status_peer(tmp_path / "peer", port=port) as peer, running_node(config) as node:
        wait_until(lambda: _states(node).get("done", 0) == 1, 30)
        (received,) = peer.files().values()
    assert dcmread(received).InstitutionName == "Morphed"


def test_jobs_of_a_destination_removed_from_the_config_become_dead_letters(
    tmp_path: Path, database_url: str
) -> None:
    config = make_config(tmp_path, database_url, destination=[_dest("gone", free_port())],
                         route=_all_to("gone"))
    with running_node(config) as node:
        assert dcmtk.storescu(node.receiver.port, make_study(tmp_path / "s", 2)).ok
    with running_node(make_config(tmp_path, database_url)) as node, node.engine.connect() as c:
        rows = c.execute(text("SELECT state, dead_reason FROM forward_job")).all()
    assert [row[0] for row in rows] == ["dead", "dead"]
    assert all("no longer in the configuration" in row[1] for row in rows)


def test_big_endian_instance_to_a_little_endian_only_destination_is_a_dead_letter(
    tmp_path: Path, database_url: str
) -> None:
    path, _ = unique_copy("MR_small_bigendian.dcm", tmp_path / "send")
    with status_peer(tmp_path / "peer", uncompressed_only=True) as peer:
        config = make_config(tmp_path, database_url, destination=[_dest("le", peer.port)],
                             route=_all_to("le"))
        with running_node(config) as node:
            assert dcmtk.storescu(node.receiver.port, [path], options=["-xb"]).ok
            wait_until(lambda: _states(node).get("dead", 0) == 1, 30)
            with node.engine.connect() as connection:
                reason = connection.execute(text("SELECT dead_reason FROM forward_job")).scalar()
        assert peer.received() == []
    assert "Big Endian" in reason


def test_downloads_left_by_a_previous_run_are_removed_at_start(
    tmp_path: Path, database_url: str
) -> None:
    leftover = tmp_path / "spool" / "outgoing" / f"{new_uid()}.dcm"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half a download")
    with running_node(make_config(tmp_path, database_url)):
        assert not leftover.exists()
