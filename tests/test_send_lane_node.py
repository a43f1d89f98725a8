"""The send lane in a running node: stored bytes forwarded through it arrive bit for bit,
and what it does not take goes through pynetdicom on the same association."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from sqlalchemy import text
from structlog.testing import capture_logs

from gateway.index import admin
from gateway.node import Node
from gateway.send_lane import SendLane
from tests.helpers import dcmtk
from tests.helpers.data import dataset_bytes, make_study
from tests.helpers.net import wait_until
from tests.helpers.nodes import make_config, running_node

pytestmark = pytest.mark.integration

RETRY = {"initial_seconds": 0.2, "max_seconds": 0.5, "max_attempts": 50}


@pytest.fixture
def lane_sends(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The SOP Instance UIDs sent through a send lane."""
    sent: list[str] = []
    lock = threading.Lock()
    send = SendLane.send

    def counted(self: SendLane, *args: Any, **kwargs: Any) -> Any:
        response = send(self, *args, **kwargs)
        with lock:
            sent.append(args[2])
        return response

    monkeypatch.setattr(SendLane, "send", counted)
    yield sent


def _done(node: Node) -> int:
    with node.engine.connect() as connection:
        return int(connection.execute(
            text("SELECT count(*) FROM forward_job WHERE state = 'done'")).scalar_one())


def _received(scp: dcmtk.StoreSCP) -> dict[str, bytes]:
    return {path.name.split(".", 1)[1]: dataset_bytes(path) for path in scp.files()}


@pytest.mark.parametrize("max_pdu", [None, 4096], ids=["default PDU", "4 KiB PDUs"])
def test_forwarded_instances_take_the_lane_and_arrive_bit_for_bit(
    tmp_path: Path, database_url: str, lane_sends: list[str], max_pdu: int | None
) -> None:
    # 39 KiB instances: ten fragments each with 4 KiB PDUs. DCMTK storescp in
    # bit-preserving mode is the oracle for what storescu itself sends.
    files = make_study(tmp_path / "study", 8)
    options = ["--max-pdu", str(max_pdu)] if max_pdu else []
    with dcmtk.storescp(tmp_path / "pacs", options=options) as pacs, \
            dcmtk.storescp(tmp_path / "oracle") as oracle:
        destination = {"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1",
                       "port": pacs.port, "timeout": 10.0, "retry": RETRY}
        config = make_config(tmp_path / "gw", database_url, destination=[destination],
                             route=[{"name": "all", "destinations": ["pacs"]}])
        with running_node(config) as node:
            assert dcmtk.storescu(node.receiver.port, files).ok
            wait_until(lambda: _done(node) == 8, 30, message="8 forwards done")
        assert dcmtk.storescu(oracle.port, files, called=oracle.ae_title).ok
        received, sent = _received(pacs), _received(oracle)
    assert len(received) == 8
    assert received == sent
    assert sorted(lane_sends) == sorted(received)


def _paused(node: Node, name: str, paused: bool) -> None:
    """Pause or resume a destination as an operator does."""
    with node.engine.begin() as connection:
        admin.set_paused(connection, name, paused, dt.datetime.now(dt.UTC))
    node.work.refresh_paused()


def test_lane_and_pynetdicom_sends_share_one_association(
    tmp_path: Path, database_url: str, lane_sends: list[str]
) -> None:
    # One study from two modalities: CT01's instances are morphed (pynetdicom encodes
    # them), MODALITY's go out as stored (the lane). The destination is paused until
    # all have arrived, so the whole study goes out in one batch over one association.
    study = make_study(tmp_path / "study", 6)
    morphed, plain = study[:3], study[3:]
    routes = [
        {"name": "ct", "destinations": ["pacs"], "match": {"calling_ae": "CT01"},
         "morph": {"set": {"InstitutionName": "Morphed"}}},
        {"name": "others", "destinations": ["pacs"], "match": {"calling_ae": "MODALITY"}},
    ]
    with dcmtk.storescp(tmp_path / "pacs") as pacs, \
            dcmtk.storescp(tmp_path / "oracle") as oracle:
        destination = {"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1",
                       "port": pacs.port, "timeout": 10.0, "retry": RETRY}
        config = make_config(tmp_path / "gw", database_url, destination=[destination],
                             route=routes)
        with running_node(config) as node, capture_logs() as logs:
            _paused(node, "pacs", True)
            # Queued in the order lane, lane, pynetdicom, pynetdicom, lane, pynetdicom.
            for files, calling in ((plain[:2], "MODALITY"), (morphed[:2], "CT01"),
                                   (plain[2:], "MODALITY"), (morphed[2:], "CT01")):
                assert dcmtk.storescu(node.receiver.port, files, calling=calling).ok
            _paused(node, "pacs", False)
            wait_until(lambda: _done(node) == 6, 30, message="6 forwards done")
        assert dcmtk.storescu(oracle.port, plain, called=oracle.ae_title).ok
        received, sent = _received(pacs), _received(oracle)
        arrived = {path.name.split(".", 1)[1]: dcmread(path) for path in pacs.files()}
    delivered = [entry for entry in logs if entry["event"] == "forward_association"]
    assert [entry["instances"] for entry in delivered] == [6]
    plain_uids = set(sent)
    assert sorted(lane_sends) == sorted(plain_uids)
    assert {uid: received[uid] for uid in plain_uids} == sent
    morphed_uids = set(received) - plain_uids
    assert len(morphed_uids) == 3
    assert all(arrived[uid].InstitutionName == "Morphed" for uid in morphed_uids)
