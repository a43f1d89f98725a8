"""Forwarding to real destinations: Orthanc, DCMTK storescp and a scriptable SCP."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import text
from structlog.testing import capture_logs

from gateway import forwarder
from gateway.node import Node
from tests.helpers import dcmtk
from tests.helpers.data import dataset_bytes, make_study, unique_copy
from tests.helpers.net import free_port, wait_until
from tests.helpers.nodes import SPOOLINGS, make_config, running_node, wait_uploaded
from tests.helpers.orthanc import orthanc
from tests.helpers.peers import status_peer

pytestmark = pytest.mark.integration

FAST_RETRY = {"initial_seconds": 0.2, "max_seconds": 1.0, "max_attempts": 50}


def destination(name: str, port: int, ae_title: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "ae_title": ae_title, "host": "127.0.0.1", "port": port,
            "timeout": 5.0, "retry": dict(FAST_RETRY), **extra}


@contextmanager
def gateway(tmp_path: Path, database_url: str, destinations: list[dict[str, Any]],
            routes: list[dict[str, Any]] | None = None) -> Iterator[Node]:
    routes = routes if routes is not None else [
        {"name": "everything", "destinations": [d["name"] for d in destinations]}
    ]
    config = make_config(tmp_path / "gw", database_url, destination=destinations, route=routes)
    with running_node(config) as node:
        yield node


def jobs(node: Node, sql: str = "SELECT state, count(*) FROM forward_job GROUP BY state") -> Any:
    with node.engine.connect() as connection:
        return {row[0]: row[1] for row in connection.execute(text(sql))}


def wait_done(node: Node, count: int, timeout: float = 60) -> None:
    wait_until(lambda: jobs(node).get("done", 0) >= count, timeout,
               message=f"{count} forward jobs done")


def _elements(ds: Dataset, *skip: str) -> dict[int, Any]:
    """Tag -> value of every top-level element except the named ones."""
    return {int(e.tag): e.value for e in ds if e.keyword not in skip}


def test_study_reaches_orthanc_identical_except_for_morphed_attributes(
    tmp_path: Path, database_url: str
) -> None:
    files = make_study(tmp_path / "study", 12, series=3, patient_id="P-77")
    with orthanc(tmp_path / "orthanc") as pacs:
        morph = {"set": {"InstitutionName": "Gateway General"}, "prefix": {"PatientID": "SITEA-"}}
        dest = destination("main-pacs", pacs.dicom_port, pacs.ae_title, morph=morph)
        with gateway(tmp_path, database_url, [dest]) as node:
            result = dcmtk.storescu(node.receiver.port, files)
            assert result.ok, result.output
            wait_done(node, 12)
            wait_uploaded(node.engine, 12)
            received = pacs.files_by_sop_instance_uid()
            with node.engine.connect() as connection:
                keys = [k for (k,) in connection.execute(text("SELECT object_key FROM instance"))]
            objects = Path(node.config.storage.object_store.removeprefix("file://"))
            stored = [dcmread(objects / key) for key in keys]
    # What the gateway received (DCMTK drops the files' trailing padding when sending)
    # is the reference for what it must forward.
    originals = {str(ds.SOPInstanceUID): ds for ds in stored}
    assert set(received) == {str(dcmread(path).SOPInstanceUID) for path in files}
    assert set(received) == set(originals)
    for uid, data in received.items():
        at_pacs = dcmread(io.BytesIO(data))
        original = originals[uid]
        assert at_pacs.PatientID == "SITEA-P-77"
        assert at_pacs.InstitutionName == "Gateway General"
        assert at_pacs.PixelData == original.PixelData
        assert _elements(at_pacs, "PatientID", "InstitutionName") == _elements(
            original, "PatientID", "InstitutionName"
        )
    assert all(ds.PatientID == "P-77" for ds in stored), "the stored original never changes"


@pytest.mark.parametrize("spooling", ["index", "files"])
def test_instances_still_in_the_spool_are_forwarded_from_it_byte_for_byte(
    tmp_path: Path, database_url: str, spooling: str
) -> None:
    # The object store is unusable, so every instance is still spooled when it is sent:
    # as a file in ready/, or as bytes spooled in the index.
    files = make_study(tmp_path / "study", 6)
    objects = tmp_path / "gw" / "objects"
    objects.parent.mkdir()
    objects.write_text("a file where the store's directory should be")
    # DCMTK storescp in bit-preserving mode is the oracle for what storescu sent.
    with dcmtk.storescp(tmp_path / "pacs") as pacs, \
            dcmtk.storescp(tmp_path / "oracle") as oracle:
        dest = destination("pacs", pacs.port, pacs.ae_title)
        config = make_config(tmp_path / "gw", database_url, destination=[dest],
                             route=[{"name": "all", "destinations": ["pacs"]}],
                             storage=SPOOLINGS[spooling])
        with running_node(config) as node:
            result = dcmtk.storescu(node.receiver.port, files)
            assert result.ok, result.output
            wait_done(node, 6)
            assert jobs(node, "SELECT state, count(*) FROM instance GROUP BY state") == {
                "spooled": 6}
        assert dcmtk.storescu(oracle.port, files, called=oracle.ae_title).ok
        received, sent = ({path.name.split(".", 1)[1]: dataset_bytes(path)
                           for path in scp.files()} for scp in (pacs, oracle))
    assert len(received) == 6
    assert received == sent


def test_destination_down_at_first_gets_everything_after_retry(
    tmp_path: Path, database_url: str
) -> None:
    port = free_port()
    dest = destination("late-pacs", port, "STORESCP")
    files = make_study(tmp_path / "study", 4)
    with gateway(tmp_path, database_url, [dest]) as node:
        assert dcmtk.storescu(node.receiver.port, files).ok
        wait_until(lambda: _attempts(node) >= 1, 10, message="a failed attempt")
        assert jobs(node).get("done", 0) == 0
        with dcmtk.storescp(tmp_path / "scp", port=port) as scp:
            wait_done(node, 4, timeout=30)
            assert len(scp.files()) == 4


def _attempts(node: Node) -> int:
    with node.engine.connect() as connection:
        return int(connection.execute(text("SELECT count(*) FROM forward_attempt")).scalar_one())


def test_transactional_outbox_records_every_obligation_at_receive_time(
    tmp_path: Path, database_url: str
) -> None:
    dests = [destination("a", free_port(), "A"), destination("b", free_port(), "B")]
    with gateway(tmp_path, database_url, dests) as node:
        assert dcmtk.storescu(node.receiver.port, make_study(tmp_path / "s", 5)).ok
        rows = jobs(node, "SELECT destination, count(*) FROM forward_job GROUP BY destination")
    assert rows == {"a": 5, "b": 5}


def test_one_dead_destination_does_not_delay_the_other(tmp_path: Path, database_url: str) -> None:
    with status_peer(tmp_path / "alive") as alive:
        dests = [destination("dead", free_port(), "DEAD"),
                 destination("alive", alive.port, alive.ae_title)]
        files = make_study(tmp_path / "study", 20)
        with gateway(tmp_path, database_url, dests) as node:
            started = time.monotonic()
            assert dcmtk.storescu(node.receiver.port, files).ok
            wait_until(lambda: len(alive.stored()) == 20, 20, message="all at the live PACS")
            assert time.monotonic() - started < 15
            pending = jobs(node, "SELECT state, count(*) FROM forward_job"
                                 " WHERE destination = 'dead' GROUP BY state")
            assert pending.get("done", 0) == 0


def test_rejecting_destination_is_retried_then_dead_lettered_with_the_reason(
    tmp_path: Path, database_url: str
) -> None:
    with status_peer(tmp_path / "rejecting", reject=True) as peer:
        dest = destination("strict", peer.port, peer.ae_title,
                           retry={"initial_seconds": 0.1, "max_seconds": 0.2, "max_attempts": 3})
        with gateway(tmp_path, database_url, [dest]) as node:
            with capture_logs() as logs:
                assert dcmtk.storescu(node.receiver.port, make_study(tmp_path / "s", 1)).ok
                wait_until(lambda: jobs(node).get("dead", 0) == 1, 30)
            with node.engine.connect() as connection:
                reason, attempts = connection.execute(
                    text("SELECT dead_reason, attempts FROM forward_job")).one()
    assert attempts == 3
    assert "association rejected" in reason and "calling AE title not recognised" in reason
    assert any(e["event"] == "dead_letter" for e in logs)
    assert any(e["event"] == "destination_unavailable" for e in logs)


@pytest.mark.parametrize(
    ("statuses", "final_state", "detail"),
    [
        ([0xA700, 0xA700], "done", None),  # out of resources: retried until it works
        ([0xA900], "dead", "0xA900"),  # data set does not match SOP class
        ([0xC000], "dead", "0xC000"),  # cannot understand
        ([0xB000], "done", "0xB000"),  # warning: delivered, warning kept
        ([0xB006], "done", "0xB006"),  # elements discarded
        ([0xB007], "done", "0xB007"),  # data set does not match SOP class
    ],
    ids=["A700-transient", "A900-permanent", "C000-permanent", "B000-warning", "B006-warning",
         "B007-warning"],
)
def test_status_classes_decide_the_outcome(
    tmp_path: Path, database_url: str, statuses: list[int], final_state: str, detail: str | None
) -> None:
    with status_peer(tmp_path / "peer", statuses=statuses, then=0) as peer:
        dest = destination("scripted", peer.port, peer.ae_title)
        with gateway(tmp_path, database_url, [dest]) as node:
            assert dcmtk.storescu(node.receiver.port, make_study(tmp_path / "s", 1)).ok
            wait_until(lambda: jobs(node).get(final_state, 0) == 1, 30,
                       message=f"job {final_state}")
            with node.engine.connect() as connection:
                job = connection.execute(text(
                    "SELECT attempts, last_status, warning, dead_reason FROM forward_job")).one()
                attempts = connection.execute(text(
                    "SELECT outcome, status FROM forward_attempt ORDER BY id")).all()
    assert [status for _, status in attempts] == statuses + ([0] if final_state == "done"
                                                             and statuses[0] >= 0xA700
                                                             and statuses[0] < 0xA800 else [])
    if final_state == "dead":
        assert detail in job.dead_reason
    if final_state == "done" and detail:
        assert detail in job.warning
        assert [outcome for outcome, _ in attempts] == ["warning"]
        assert len(peer.stored()) == 1


def test_jpeg2000_instance_is_decompressed_for_a_destination_that_wants_uncompressed(
    tmp_path: Path, database_url: str
) -> None:
    path, uid = unique_copy("MR_small_jp2klossless.dcm", tmp_path / "send")
    with status_peer(tmp_path / "peer", uncompressed_only=True) as peer:
        dest = destination("old-pacs", peer.port, peer.ae_title)
        with gateway(tmp_path, database_url, [dest]) as node:
            assert dcmtk.storescu(node.receiver.port, [path], options=["-xv"]).ok
            wait_done(node, 1)
            with node.engine.connect() as connection:
                stored_syntax = connection.execute(
                    text("SELECT transfer_syntax_uid FROM instance")).scalar_one()
        ((received_uid, _, syntax),) = peer.received()
        (received,) = peer.files().values()
    assert stored_syntax == "1.2.840.10008.1.2.4.90", "stored as received"
    assert received_uid == uid
    assert syntax in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")
    original = dcmread(path)
    forwarded = dcmread(received)
    assert forwarded.SOPInstanceUID == uid, "decompression must keep the SOP Instance UID"
    assert (forwarded.pixel_array == original.pixel_array).all(), "same pixels, uncompressed"


def test_without_decompression_an_unacceptable_syntax_is_a_dead_letter_saying_why(
    tmp_path: Path, database_url: str
) -> None:
    path, _ = unique_copy("JPEG2000.dcm", tmp_path / "send")
    with status_peer(tmp_path / "peer", uncompressed_only=True) as peer:
        dest = destination("strict-pacs", peer.port, peer.ae_title, decompress=False)
        with gateway(tmp_path, database_url, [dest]) as node:
            assert dcmtk.storescu(node.receiver.port, [path], options=["-xw"]).ok
            wait_until(lambda: jobs(node).get("dead", 0) == 1, 30)
            with node.engine.connect() as connection:
                reason = connection.execute(text("SELECT dead_reason FROM forward_job")).scalar()
        assert peer.received() == []
    assert "no presentation context" in reason
    assert "JPEG 2000" in reason and "decompression is disabled" in reason


def test_a_study_goes_out_as_soon_as_its_association_ends(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A worker that finds a study still arriving lets more of it gather before claiming
    # (_GATHER_SECONDS); the end of the association that brought it ends that wait.
    monkeypatch.setattr(forwarder, "_GATHER_SECONDS", 120.0)
    with dcmtk.storescp(tmp_path / "pacs") as pacs:
        dest = destination("pacs", pacs.port, pacs.ae_title)
        with gateway(tmp_path, database_url, [dest]) as node:
            assert dcmtk.storescu(node.receiver.port, make_study(tmp_path / "s", 10)).ok
            wait_done(node, 10, timeout=30)
        assert len(pacs.files()) == 10


def test_parallel_associations_deliver_each_instance_once(
    tmp_path: Path, database_url: str
) -> None:
    with status_peer(tmp_path / "peer", delay=0.01) as peer:
        dest = destination("wide", peer.port, peer.ae_title, max_associations=3, batch_size=5)
        studies = [make_study(tmp_path / f"s{i}", 10) for i in range(3)]
        with gateway(tmp_path, database_url, [dest]) as node:
            for files in studies:
                assert dcmtk.storescu(node.receiver.port, files).ok
            wait_done(node, 30)
        counts = peer.stored()
    assert len(counts) == 30
    assert set(counts.values()) == {1}


def test_unrouted_instances_are_kept_and_counted(tmp_path: Path, database_url: str) -> None:
    routes = [{"name": "mr-only", "destinations": ["pacs"], "match": {"Modality": "MR"}}]
    dest = destination("pacs", free_port(), "PACS")
    with gateway(tmp_path, database_url, [dest], routes) as node:
        with capture_logs() as logs:
            assert dcmtk.storescu(node.receiver.port, make_study(tmp_path / "ct", 3)).ok
            wait_until(lambda: any(e["event"] == "association_released" for e in logs), 5)
        wait_uploaded(node.engine, 3)
        with node.engine.connect() as connection:
            unrouted = connection.execute(text(
                "SELECT count(*) FROM instance WHERE routed = false")).scalar_one()
            queued = connection.execute(text("SELECT count(*) FROM forward_job")).scalar_one()
    assert (unrouted, queued) == (3, 0)
    released = next(e for e in logs if e["event"] == "association_released")
    assert released["unrouted"] == 3


def test_each_forward_association_is_logged(tmp_path: Path, database_url: str) -> None:
    with status_peer(tmp_path / "peer") as peer:
        dest = destination("pacs", peer.port, peer.ae_title)
        with gateway(tmp_path, database_url, [dest]) as node, capture_logs() as logs:
            assert dcmtk.storescu(node.receiver.port, make_study(tmp_path / "s", 3)).ok
            wait_done(node, 3)
            wait_until(lambda: sum(e.get("instances", 0) for e in logs
                                   if e["event"] == "forward_association") == 3, 5)
    # Forwarding overlaps receiving, so the study may go out over several associations.
    events = [e for e in logs if e["event"] == "forward_association"]
    assert all(e["destination"] == "pacs" and e["outcome"] == "completed" for e in events)
    assert sum(e["bytes"] for e in events) > 3 * 39000
    assert all("duration_s" in e and "forward_association_id" in e for e in events)
