"""Who may associate, what the rejection says, and what the association log records."""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import text
from structlog.testing import capture_logs

from gateway.config import GatewayConfig
from gateway.index.repository import AssociationFacts
from gateway.node import Node
from gateway.receiver import Receiver, _Session
from tests.helpers import dcmtk
from tests.helpers.data import make_study
from tests.helpers.net import LOOPBACK, wait_until
from tests.helpers.nodes import make_config, running_node

pytestmark = pytest.mark.integration


def _association_rows(node: Node, expected: int | None = None) -> list[dict[str, object]]:
    """The association log; with *expected*, wait until that many rows are closed (the
    row of a rejection is written while the A-ASSOCIATE-RJ is already on its way)."""

    def rows() -> list[dict[str, object]]:
        with node.engine.connect() as connection:
            result = connection.execute(text("SELECT * FROM association ORDER BY requested_at"))
            return [dict(row._mapping) for row in result]

    if expected is not None:
        wait_until(lambda: len([r for r in rows() if r["ended_at"] is not None]) >= expected, 5)
    return rows()


def test_unknown_calling_ae_is_rejected_permanently_and_logged(node: Node, tmp_path: Path) -> None:
    with capture_logs() as logs:
        result = dcmtk.storescu(node.receiver.port, make_study(tmp_path, 1), calling="INTRUDER")
    assert not result.ok
    assert "Rejected Permanent, Source: Service User" in result.output
    assert "Calling AE Title Not Recognized" in result.output
    (event,) = [entry for entry in logs if entry["event"] == "association_rejected"]
    assert event["calling_ae"] == "INTRUDER"
    assert (event["result"], event["source"], event["diagnostic"]) == (1, 1, 3)
    assert "INTRUDER" in event["reason"]
    (row,) = _association_rows(node, 1)
    assert row["outcome"] == "rejected"
    assert row["calling_ae"] == "INTRUDER"
    assert "not configured" in str(row["reject_reason"])


def test_wrong_called_ae_is_rejected_with_called_ae_not_recognised(
    node: Node, tmp_path: Path
) -> None:
    result = dcmtk.storescu(node.receiver.port, make_study(tmp_path, 1), called="OTHERNODE")
    assert not result.ok
    assert "Called AE Title Not Recognized" in result.output
    (row,) = _association_rows(node, 1)
    assert row["outcome"] == "rejected"
    assert "OTHERNODE" in str(row["reject_reason"])


@pytest.mark.parametrize(
    ("hosts", "accepted"),
    [(["10.9.9.9"], False), (["10.0.0.0/8", "127.0.0.0/8"], True), (["127.0.0.1"], True)],
)
def test_calling_ae_restricted_to_hosts(
    tmp_path: Path, hosts: list[str], accepted: bool
) -> None:
    config = make_config(
        tmp_path, f"sqlite:///{tmp_path / 'index.db'}",
        calling_ae=[{"ae_title": "CT01", "hosts": hosts}],
    )
    with running_node(config) as node:
        result = dcmtk.storescu(node.receiver.port, make_study(tmp_path / "s", 1), calling="CT01")
    assert result.ok is accepted, result.output
    if not accepted:
        assert "Calling AE Title Not Recognized" in result.output


def test_unknown_calling_ae_accepted_when_configured(tmp_path: Path, database_url: str) -> None:
    config = make_config(tmp_path, database_url, node={"accept_unknown_calling_ae": True})
    with running_node(config) as node:
        result = dcmtk.storescu(node.receiver.port, make_study(tmp_path / "s", 2), calling="NEWCT")
    assert result.ok, result.output


def test_associations_beyond_the_limit_are_rejected_transiently(tmp_path: Path) -> None:
    """Local limit exceeded, transient. echoscu closes the connection the moment it
    reads the A-ASSOCIATE-RJ; each of those must still be a rejection in the log and the
    table, never an abort (repeated: it was a race)."""
    config = make_config(
        tmp_path, f"sqlite:///{tmp_path / 'index.db'}", node={"max_associations": 1}
    )
    with running_node(config) as node:
        holder = AE(ae_title="MODALITY")
        holder.add_requested_context(Verification)
        held = holder.associate(LOOPBACK, node.receiver.port, ae_title="GATEWAY")
        assert held.is_established
        try:
            with capture_logs() as logs:
                for _ in range(8):
                    result = dcmtk.echoscu(node.receiver.port)
                    assert not result.ok
                    assert "Rejected Transient" in result.output
                    assert "local-limit-exceeded" in result.output.lower().replace(" ", "-")
        finally:
            held.release()
        rows = _association_rows(node, 9)
    assert rows[0]["outcome"] == "released"  # the held one was requested first
    assert sorted(row["outcome"] for row in rows) == ["rejected"] * 8 + ["released"]
    assert len([e for e in logs if e["event"] == "association_rejected"]) == 8
    assert not [e for e in logs if e["event"] == "association_aborted"]


def test_association_log_records_instances_bytes_and_outcome(node: Node, tmp_path: Path) -> None:
    files = make_study(tmp_path, 5)
    with capture_logs() as logs:
        result = dcmtk.storescu(node.receiver.port, files)
        assert result.ok, result.output
        wait_until(lambda: any(e["event"] == "association_released" for e in logs), 5)
    events = [entry["event"] for entry in logs if entry["event"].startswith("association_")]
    assert events == ["association_requested", "association_accepted", "association_released"]
    requested = next(e for e in logs if e["event"] == "association_requested")
    assert requested["peer_address"] == "127.0.0.1"
    assert requested["called_ae"] == "GATEWAY"
    released = next(e for e in logs if e["event"] == "association_released")
    assert released["instances"] == 5
    assert released["bytes"] > 5 * 39000
    assert released["duration_s"] >= 0
    assert len({e["assoc_id"] for e in logs if "assoc_id" in e}) == 1
    # The row is closed right after the event is logged.
    wait_until(lambda: _association_rows(node)[0]["outcome"] == "released", 5)
    (row,) = _association_rows(node)
    assert row["outcome"] == "released"
    assert row["instances_received"] == 5
    assert row["bytes_received"] == released["bytes"]
    assert row["calling_ae"] == "STORESCU"
    assert row["peer_address"] == "127.0.0.1"
    assert row["ended_at"] is not None


def test_logs_carry_no_patient_names_or_ids(node: Node, tmp_path: Path) -> None:
    files = make_study(tmp_path, 2, patient_id="PHI-ID-424242")
    with capture_logs() as logs:
        result = dcmtk.storescu(node.receiver.port, files)
        assert result.ok
        result = dcmtk.storescu(node.receiver.port, files)  # duplicates are logged too
        assert result.ok
    text_of_logs = repr(logs)
    assert "PHI-ID-424242" not in text_of_logs
    assert "Synthetic" not in text_of_logs


def test_associations_dropped_right_after_acceptance_are_closed_in_the_log(
    gateway_config: GatewayConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pynetdicom reports the acceptance and the abort on different threads, so a peer
    # that aborts at once can be seen to abort before it was accepted. The acceptance
    # is held back here so that happens every time; the row must still be written.
    reported_late = Receiver._on_accepted

    def accepted_late(receiver: Receiver, event: Any) -> None:
        time.sleep(0.3)
        reported_late(receiver, event)

    monkeypatch.setattr(Receiver, "_on_accepted", accepted_late)
    with running_node(gateway_config) as node:
        for _ in range(3):
            ae = AE(ae_title="MODALITY")
            ae.add_requested_context(Verification)
            assoc = ae.associate(LOOPBACK, node.receiver.port, ae_title="GATEWAY")
            assert assoc.is_established
            assoc.abort()

        def all_closed() -> bool:
            rows = _association_rows(node)
            return len(rows) == 3 and all(row["outcome"] == "aborted" for row in rows)

        wait_until(all_closed, 10, message="three aborted association rows")
        assert all(row["ended_at"] is not None for row in _association_rows(node))


@pytest.mark.parametrize(("rejected", "outcome"), [(False, "aborted"), (True, "rejected")])
def test_a_connection_closed_before_its_outcome_was_handled_gets_its_row(
    node: Node, rejected: bool, outcome: str
) -> None:
    # The connection close can be handled before EVT_ACCEPTED or EVT_REJECTED (other
    # threads): the row is written then, with what the association really was.
    facts = AssociationFacts(
        association_id=str(uuid.uuid4()), node=node.name, calling_ae="MODALITY",
        called_ae="GATEWAY", peer_address="127.0.0.1", peer_port=4242,
        requested_at=dt.datetime.now(dt.UTC),
    )
    # What pynetdicom leaves on an association it rejected itself (local limit).
    primitive = SimpleNamespace(result=2, result_source=3, diagnostic=2)
    assoc = _Association(rejected, primitive)
    node.receiver._sessions[assoc] = _Session(facts)
    node.receiver._on_connection_closed(SimpleNamespace(assoc=assoc))
    node.receiver._on_rejected_by_provider(SimpleNamespace(assoc=assoc))  # late: no effect
    (row,) = _association_rows(node)
    assert row["outcome"] == outcome
    assert row["ended_at"] is not None
    if rejected:
        assert row["reject_reason"] == "rejected by the DICOM upper layer"


class _Association:
    """What the receiver reads of a pynetdicom association (hashable, like one)."""

    def __init__(self, rejected: bool, primitive: object) -> None:
        self.is_rejected = rejected
        self.acceptor = SimpleNamespace(primitive=primitive)
        self.dimse = None


def test_a_peer_closing_right_after_the_release_response_is_a_release(
    node: Node, tmp_path: Path
) -> None:
    # DCMTK closes the connection as soon as it has our A-RELEASE-RP, which can be
    # before pynetdicom reports the release: those associations were released.
    files = make_study(tmp_path, 1)
    for _ in range(8):
        assert dcmtk.storescu(node.receiver.port, files).ok
    rows = _association_rows(node, expected=8)
    assert [row["outcome"] for row in rows] == ["released"] * 8


def test_stop_waits_for_the_log_of_an_association_released_just_before(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gateway.receiver as receiver_module

    finish = receiver_module.repository.finish_association
    writing, written = threading.Event(), threading.Event()

    def slow_finish(*args: Any, **kwargs: Any) -> None:
        writing.set()
        time.sleep(1.0)  # the release is logged while the stop begins
        finish(*args, **kwargs)
        written.set()

    monkeypatch.setattr(receiver_module.repository, "finish_association", slow_finish)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    assoc = ae.associate(LOOPBACK, node.receiver.port, ae_title="GATEWAY")
    assert assoc.is_established
    assoc.release()
    assert writing.wait(5)
    node.receiver.stop(5.0)
    # Returned only once the log was written: the process may exit right after.
    assert written.is_set()
    (row,) = _association_rows(node)
    assert row["outcome"] == "released"
