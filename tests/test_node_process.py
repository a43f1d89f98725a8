"""The node as operators run it: a process that stops gracefully and stays small."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import Engine, create_engine, text

from tests.helpers import dcmtk
from tests.helpers.data import make_study, write_large_instance
from tests.helpers.net import LOOPBACK, port_open, wait_until
from tests.helpers.nodes import (
    SPOOLINGS,
    event_time,
    node_process,
    spooled_copies,
    wait_uploaded,
)
from tests.helpers.scu import SendReport, send_files

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_lets_the_association_in_flight_finish(
    tmp_path: Path, database_url: str, signum: signal.Signals
) -> None:
    files = make_study(tmp_path / "study", 40)
    with node_process(tmp_path / "node", database_url) as node:
        reports: list[SendReport] = []
        acknowledged: list[str] = []
        sender = threading.Thread(
            target=lambda: reports.append(send_files(
                node.port, files, pause=0.05,
                on_response=lambda _i, uid, status: acknowledged.append(uid),
            ))
        )
        sender.start()
        wait_until(lambda: len(acknowledged) >= 10, 30)
        node.signal(signum)
        wait_until(lambda: not port_open(node.port), 5, message="the listener to close")
        sender.join(60)
        assert node.wait(30) == 0
        (report,) = reports
        assert report.error is None
        assert [status for _, status in report.statuses] == [0] * 40
        events = node.log_events()

    names = [event["event"] for event in events]
    for expected in ("signal_received", "node_stopping", "listener_stopped", "node_stopped"):
        assert expected in names
    stopped = next(e for e in events if e["event"] == "listener_stopped")
    assert stopped["aborted"] == 0
    # The signal came while the association was in flight, and the node stopped as soon
    # as it was released, not at the 30 s stop timeout.
    signalled, released = event_time(events, "signal_received"), event_time(
        events, "association_released")
    assert signalled < released
    assert (event_time(events, "node_stopped") - released).total_seconds() < 10
    accepted = [e for e in events if e["event"] == "association_accepted"]
    assert accepted and all("assoc_id" in e and e["calling_ae"] == "MODALITY" for e in accepted)
    engine = create_engine(database_url)
    with engine.connect() as connection:
        count = connection.execute(text("SELECT count(*) FROM instance")).scalar_one()
        outcome = connection.execute(text("SELECT outcome FROM association")).scalar_one()
    engine.dispose()
    assert count == 40
    assert outcome == "released"


def test_sigterm_aborts_an_idle_association_after_the_stop_timeout(
    tmp_path: Path, database_url: str
) -> None:
    with node_process(tmp_path / "node", database_url, node={"stop_timeout": 2.0}) as node:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(Verification)
        held = ae.associate(LOOPBACK, node.port, ae_title="GATEWAY")
        assert held.is_established
        node.signal(signal.SIGTERM)
        assert node.wait(30) == 0
        wait_until(lambda: not held.is_established, 5)
        events = node.log_events()
    # Aborted once the 2 s stop timeout ran out, then the node stopped promptly (a port
    # probe's bare connection waiting for its A-ASSOCIATE-RQ does not hold it up).
    waited = event_time(events, "association_aborted_at_stop") - event_time(
        events, "signal_received")
    assert 2.0 <= waited.total_seconds() < 10
    stopping = event_time(events, "node_stopped") - event_time(
        events, "association_aborted_at_stop")
    assert stopping.total_seconds() < 5


@pytest.mark.parametrize("spooling", ["index", "files"])
def test_restart_after_clean_stop_uploads_what_was_left_in_the_spool(
    tmp_path: Path, database_url: str, spooling: str
) -> None:
    root = tmp_path / "node"
    root.mkdir()
    (root / "objects").write_text("object store unavailable during the first run")
    files = make_study(tmp_path / "study", 5)
    with node_process(root, database_url, storage=SPOOLINGS[spooling]) as node:
        assert dcmtk.storescu(node.port, files).ok
        node.signal(signal.SIGTERM)
        assert node.wait(30) == 0
        engine = create_engine(database_url)
        try:
            left = spooled_copies(engine, root / "spool")
            assert left == ((5, 0) if spooling == "index" else (0, 5))
            (root / "objects").unlink()
            node.start()
            wait_uploaded(engine, 5)
            wait_until(lambda: spooled_copies(engine, root / "spool") == (0, 0), 10,
                       message="the spooled copies deleted once uploaded")
        finally:
            engine.dispose()


@pytest.mark.slow
@pytest.mark.parametrize("sender", ["dcmtk", "pynetdicom"])
def test_a_large_instance_is_streamed_without_growing_memory(
    tmp_path: Path, database_url: str, sender: str
) -> None:
    # DCMTK sends 16 KiB PDUs; pynetdicom sends PDUs as large as the node advertises.
    size = 300 * 1024 * 1024
    big = tmp_path / "big.dcm"
    write_large_instance(big, size)
    with node_process(tmp_path / "node", database_url) as node:
        baseline_kib = node.peak_rss_kib()
        if sender == "dcmtk":
            result = dcmtk.storescu(node.port, [big], timeout=600)
            assert result.ok, result.output
        else:
            report = send_files(node.port, [big], timeout=600)
            assert report.statuses and report.statuses[0][1] == 0, report
        engine = create_engine(database_url)
        try:
            wait_uploaded(engine, 1, timeout=120)
            with engine.connect() as connection:
                stored_size = connection.execute(text("SELECT size FROM instance")).scalar_one()
        finally:
            engine.dispose()
        peak_kib = node.peak_rss_kib()
    assert stored_size >= size
    growth_mib = (peak_kib - baseline_kib) / 1024
    assert growth_mib < 64, f"RSS grew by {growth_mib:.0f} MiB while receiving 300 MiB"


def test_memory_does_not_grow_with_the_size_of_a_study(tmp_path: Path, database_url: str) -> None:
    warm_up = make_study(tmp_path / "warm-up", 50)
    study = make_study(tmp_path / "study", 600)
    with node_process(tmp_path / "node", database_url) as node:
        result = dcmtk.storescu(node.port, warm_up)
        assert result.ok, result.output
        baseline_kib = node.peak_rss_kib()
        result = dcmtk.storescu(node.port, study, timeout=300)
        assert result.ok, result.output
        engine = create_engine(database_url)
        try:
            wait_uploaded(engine, 650, timeout=120)
        finally:
            engine.dispose()
        peak_kib = node.peak_rss_kib()
    growth_mib = (peak_kib - baseline_kib) / 1024
    assert growth_mib < 32, f"RSS grew by {growth_mib:.0f} MiB over a 600-instance study"


@pytest.mark.slow
def test_a_large_instance_is_forwarded_without_growing_memory(
    tmp_path: Path, database_url: str
) -> None:
    # Forwarding as stored streams the file from the spool or the object store: the node
    # must not read the 300 MiB into memory on the way out either.
    size = 300 * 1024 * 1024
    big = tmp_path / "big.dcm"
    write_large_instance(big, size)
    with dcmtk.storescp(tmp_path / "pacs", ae_title="PACS") as pacs:
        sections = {
            "destination": [{"name": "pacs", "ae_title": "PACS", "host": LOOPBACK,
                             "port": pacs.port, "timeout": 120.0}],
            "route": [{"name": "all", "destinations": ["pacs"]}],
        }
        with node_process(tmp_path / "node", database_url, **sections) as node:
            baseline_kib = node.peak_rss_kib()
            result = dcmtk.storescu(node.port, [big], timeout=600)
            assert result.ok, result.output
            engine = create_engine(database_url)
            try:
                wait_until(lambda: _forward_states(engine) == {"done": 1}, 300,
                           message="the instance forwarded")
            finally:
                engine.dispose()
            peak_kib = node.peak_rss_kib()
        (received,) = pacs.files()
    assert received.stat().st_size >= size
    growth_mib = (peak_kib - baseline_kib) / 1024
    assert growth_mib < 64, f"RSS grew by {growth_mib:.0f} MiB while forwarding 300 MiB"


def _forward_states(engine: Engine) -> dict[str, int]:
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT state, count(*) FROM forward_job GROUP BY state"))
        return {row[0]: row[1] for row in rows}
