"""How forward associations are used: one association per held study, parallel
associations up to ``max_associations``, timeouts and aborts as transient failures, and
SOP classes a destination does not accept (real peers: the scripted status_scp)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from structlog.testing import capture_logs

from gateway.node import Node
from tests.helpers import dcmtk
from tests.helpers.admin_http import TOKEN, AdminClient
from tests.helpers.data import make_study, new_uid
from tests.helpers.net import LOOPBACK, free_port, wait_until
from tests.helpers.nodes import make_config, running_node
from tests.helpers.peers import status_peer

pytestmark = pytest.mark.integration

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def _dest(port: int, **extra: Any) -> dict[str, Any]:
    return {"name": "pacs", "ae_title": "PEER", "host": "127.0.0.1", "port": port,
            "timeout": 5.0,
            "retry": {"initial_seconds": 0.2, "max_seconds": 1.0, "max_attempts": 50}, **extra}


@contextmanager
def _gateway(tmp_path: Path, database_url: str, dest: dict[str, Any]) -> Iterator[Node]:
    token_file = tmp_path / "api-token"
    token_file.write_text(TOKEN + "\n")
    config = make_config(tmp_path / "gw", database_url, destination=[dest],
                         route=[{"name": "all", "destinations": [dest["name"]]}],
                         http={"port": 0, "token_file": str(token_file)})
    with running_node(config) as node:
        yield node


def _admin(node: Node) -> AdminClient:
    assert node.admin_server is not None
    return AdminClient(node.admin_server.port)


def _states(node: Node) -> dict[str, int]:
    with node.engine.connect() as connection:
        rows = connection.execute(text("SELECT state, count(*) FROM forward_job GROUP BY state"))
        return {row[0]: row[1] for row in rows}


def _hold_then_release(node: Node, studies: list[list[Path]]) -> None:
    """Send *studies* while the destination is paused, then resume it once all are queued."""
    api = _admin(node)
    api.post("/api/destinations/pacs/pause")
    for files in studies:
        result = dcmtk.storescu(node.receiver.port, files)
        assert result.ok, result.output
    total = sum(len(files) for files in studies)
    wait_until(lambda: _states(node) == {"pending": total}, 30, message=f"{total} jobs held")
    api.post("/api/destinations/pacs/resume")


def test_a_held_study_goes_out_over_one_association_carrying_all_its_instances(
    tmp_path: Path, database_url: str
) -> None:
    with status_peer(tmp_path / "peer") as peer:
        # Two workers, both woken at once by the resume: still one association.
        dest = _dest(peer.port, max_associations=2, batch_size=100)
        with _gateway(tmp_path, database_url, dest) as node, capture_logs() as logs:
            _hold_then_release(node, [make_study(tmp_path / "study", 10)])
            wait_until(lambda: _states(node) == {"done": 10}, 60, message="10 jobs done")
            wait_until(lambda: any(e["event"] == "forward_association" for e in logs), 10)
            with node.engine.connect() as connection:
                recorded = {row[0] for row in connection.execute(
                    text("SELECT forward_association_id FROM forward_attempt"))}
        requests = peer.requests()
    events = [e for e in logs if e["event"] == "forward_association"]
    assert [(e["instances"], e["failed"], e["untried"]) for e in events] == [(10, 0, 0)]
    assert recorded == {events[0]["forward_association_id"]}
    assert len(requests) == 10
    assert len({request.association for request in requests}) == 1, "the peer saw one association"


def test_studies_go_out_over_max_associations_in_parallel_and_never_more(
    tmp_path: Path, database_url: str
) -> None:
    # Each C-STORE takes a while, so a worker's association stays busy long enough for
    # the other worker's to overlap it (a worker alone would take over 4 s).
    with status_peer(tmp_path / "peer", delay=0.25) as peer:
        dest = _dest(peer.port, max_associations=2, batch_size=4)
        studies = [make_study(tmp_path / f"study{i}", 4) for i in range(4)]
        with _gateway(tmp_path, database_url, dest) as node:
            _hold_then_release(node, studies)
            wait_until(lambda: _states(node) == {"done": 16}, 120, message="16 jobs done")
        requests = peer.requests()
    assert len(requests) == 16
    peak_sending = max(request.in_progress for request in requests)
    peak_open = max(request.open_associations for request in requests)
    assert (peak_sending, peak_open) == (2, 2), "max_associations = 2: two at once, never more"
    assert len({request.association for request in requests}) >= 2


@pytest.mark.parametrize(
    "script",
    [{"delays": [8.0]}, {"statuses": ["abort"]}],
    ids=["response-timeout", "association-aborted"],
)
def test_a_timed_out_or_aborted_c_store_is_transient_and_the_retry_delivers(
    tmp_path: Path, database_url: str, script: dict[str, Any]
) -> None:
    # The first request is answered late (after the 2 s timeout) or aborted; the retry
    # is answered promptly.
    with (status_peer(tmp_path / "peer", **script) as peer,
          _gateway(tmp_path, database_url, _dest(peer.port, timeout=2.0)) as node):
        assert dcmtk.storescu(node.receiver.port, make_study(tmp_path / "s", 1)).ok
        wait_until(lambda: _states(node) == {"done": 1}, 60, message="the job done")
        with node.engine.connect() as connection:
            attempts = connection.execute(text(
                "SELECT outcome, status, error FROM forward_attempt ORDER BY id")).all()
            job = connection.execute(text(
                "SELECT attempts, dead_reason FROM forward_job")).one()
    assert [(outcome, status) for outcome, status, _ in attempts] == [
        ("transient", None), ("success", 0)]
    assert "no response from the destination" in attempts[0].error
    assert (job.attempts, job.dead_reason) == (2, None)


def test_a_destination_that_never_answers_the_association_request_is_retried(
    tmp_path: Path, database_url: str
) -> None:
    # The kernel completes the TCP handshakes of a listening socket that nobody accepts
    # from: the association request goes out and is never answered.
    port = free_port()
    with socket.socket() as silent:
        silent.bind((LOOPBACK, port))
        silent.listen(16)
        with _gateway(tmp_path, database_url, _dest(port, timeout=1.0)) as node:
            assert dcmtk.storescu(node.receiver.port, make_study(tmp_path / "s", 1)).ok
            wait_until(lambda: len(_attempts(node)) >= 2, 30, message="two failed attempts")
            silent.close()
            with status_peer(tmp_path / "peer", port=port) as peer:
                wait_until(lambda: _states(node) == {"done": 1}, 60, message="the job done")
                attempts = _attempts(node)
            assert len(peer.stored()) == 1
    assert [outcome for outcome, _ in attempts[:-1]] == ["transient"] * (len(attempts) - 1)
    assert attempts[-1][0] == "success"
    unanswered = f"no answer from PEER@127.0.0.1:{port} to the association request within 1 s"
    assert attempts[0][1] == unanswered


def _attempts(node: Node) -> list[tuple[str, str | None]]:
    with node.engine.connect() as connection:
        rows = connection.execute(text("SELECT outcome, error FROM forward_attempt ORDER BY id"))
        return [(row[0], row[1]) for row in rows]


@pytest.mark.parametrize("with_accepted_class", [False, True], ids=["alone", "in-a-mixed-study"])
def test_a_sop_class_the_destination_does_not_accept_is_a_dead_letter_saying_so(
    tmp_path: Path, database_url: str, with_accepted_class: bool
) -> None:
    study_uid = new_uid()
    mr = make_study(tmp_path / "mr", 2, template="MR_small.dcm", study_uid=study_uid)
    ct = make_study(tmp_path / "ct", 2, study_uid=study_uid) if with_accepted_class else []
    with status_peer(tmp_path / "peer", sop_classes=[CT_IMAGE_STORAGE]) as peer:
        with _gateway(tmp_path, database_url, _dest(peer.port)) as node, capture_logs() as logs:
            assert dcmtk.storescu(node.receiver.port, [*mr, *ct]).ok
            expected = {"dead": 2, **({"done": 2} if ct else {})}
            wait_until(lambda: _states(node) == expected, 60, message=f"jobs {expected}")
            with node.engine.connect() as connection:
                rows = connection.execute(text(
                    "SELECT i.sop_class_uid, i.sop_instance_uid, j.state, j.attempts,"
                    " j.dead_reason FROM forward_job j JOIN instance i ON i.id = j.instance_pk"
                )).all()
        stored = set(peer.stored())
    dead = [row for row in rows if row.state == "dead"]
    assert {row.sop_class_uid for row in dead} == {"1.2.840.10008.5.1.4.1.1.4"}  # MR
    assert all(row.attempts == 1 for row in dead), "never retried"
    assert all("destination accepted no presentation context for MR Image Storage"
               in row.dead_reason for row in dead)
    letters = [e for e in logs if e["event"] == "dead_letter"]
    assert sorted(e["sop_instance_uid"] for e in letters) == sorted(
        row.sop_instance_uid for row in dead)
    assert all("MR Image Storage" in e["reason"] for e in letters)
    assert stored == {row.sop_instance_uid for row in rows if row.state == "done"}
