"""The forwarding admin commands, run as an admin would against a running node's index."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from sqlalchemy import text

from gateway.config import GatewayConfig
from gateway.node import Node
from tests.helpers import dcmtk
from tests.helpers.data import make_study
from tests.helpers.net import free_port, wait_until
from tests.helpers.nodes import config_data, running_node, to_toml
from tests.helpers.peers import status_peer

pytestmark = pytest.mark.integration


@contextmanager
def node_with_config_file(
    tmp_path: Path, database_url: str, destinations: list[dict[str, Any]],
    routes: list[dict[str, Any]],
) -> Iterator[tuple[Node, Path]]:
    data = config_data(tmp_path / "gw", database_url, destination=destinations, route=routes)
    data["node"]["worker_process"] = False  # the tests wake the forwarder directly
    path = tmp_path / "gateway.toml"
    path.write_text(to_toml(data))
    with running_node(GatewayConfig.model_validate(data)) as node:
        yield node, path


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args, "--config", str(config)],
        capture_output=True, text=True, check=False, timeout=60,
    )


def dest(name: str, port: int, **extra: Any) -> dict[str, Any]:
    return {"name": name, "ae_title": "PEER", "host": "127.0.0.1", "port": port, "timeout": 5.0,
            "retry": {"initial_seconds": 0.2, "max_seconds": 0.5, "max_attempts": 100}, **extra}


def test_queue_shows_per_destination_backlog_and_unrouted(
    tmp_path: Path, database_url: str
) -> None:
    routes = [{"name": "ct", "destinations": ["down"], "match": {"Modality": "CT"}}]
    with node_with_config_file(tmp_path, database_url, [dest("down", free_port())], routes) as (
        node, config,
    ):
        assert dcmtk.storescu(node.receiver.port, make_study(tmp_path / "ct", 3)).ok
        assert dcmtk.storescu(
            node.receiver.port, make_study(tmp_path / "mr", 2, template="MR_small.dcm")
        ).ok
        result = cli(config, "queue", "--json")
        assert result.returncode == 0, result.stderr
        status = json.loads(result.stdout)
        text_result = cli(config, "queue")
    (down,) = status["destinations"]
    assert down["destination"] == "down"
    assert down["pending"] + down["in_flight"] == 3
    assert down["done"] == 0
    assert status["unrouted"] == 2
    assert "down" in text_result.stdout and "unrouted instances: 2" in text_result.stdout


def test_dead_letters_are_listed_with_reason_and_can_be_requeued(
    tmp_path: Path, database_url: str
) -> None:
    with status_peer(tmp_path / "peer", statuses=[0xC000, 0xC000], then=0) as peer:
        routes = [{"name": "all", "destinations": ["pacs"]}]
        with node_with_config_file(tmp_path, database_url, [dest("pacs", peer.port)], routes) as (
            node, config,
        ):
            files = make_study(tmp_path / "study", 2)
            study_uid = str(dcmread(files[0]).StudyInstanceUID)
            assert dcmtk.storescu(node.receiver.port, files).ok
            wait_until(lambda: _count(node, "dead") == 2, 30)

            listed = cli(config, "dead-letters")
            assert listed.returncode == 0, listed.stderr
            assert listed.stdout.count("status 0xC000") == 2
            assert "cannot understand" in listed.stdout
            letters = json.loads(cli(config, "dead-letters", "--json").stdout)
            assert {letter["destination"] for letter in letters} == {"pacs"}
            assert cli(config, "dead-letters", "--destination", "other").stdout.strip() == (
                "no dead letters"
            )

            first = cli(config, "requeue", "--id", str(letters[0]["id"]))
            assert first.stdout.strip() == "requeued 1 dead letter(s)"
            node.forwarder.wake()
            wait_until(lambda: _count(node, "done") == 1, 30)
            by_study = cli(config, "requeue", "--study", study_uid)
            assert by_study.stdout.strip() == "requeued 1 dead letter(s)"
            node.forwarder.wake()
            wait_until(lambda: _count(node, "done") == 2, 30)
            assert cli(config, "requeue", "--destination", "pacs").stdout.strip() == (
                "requeued 0 dead letter(s)"
            )
            assert cli(config, "requeue").returncode == 2
            assert cli(config, "requeue", "--destination", "nope").returncode == 2
        assert len(peer.stored()) == 2


def _count(node: Node, state: str) -> int:
    with node.engine.connect() as connection:
        return int(connection.execute(
            text("SELECT count(*) FROM forward_job WHERE state = :state"), {"state": state}
        ).scalar_one())


def test_route_test_shows_routes_destinations_and_morphed_values(tmp_path: Path) -> None:
    data = config_data(
        tmp_path, f"sqlite:///{tmp_path / 'index.db'}",
        destination=[dest("main-pacs", 104, morph={"prefix": {"PatientID": "SITEA-"}}),
                     dest("vna", 105)],
        route=[
            {"name": "ct-from-ct01", "destinations": ["main-pacs", "vna"],
             "match": {"calling_ae": "CT01", "Modality": ["CT", "PT"]},
             "morph": {"set": {"InstitutionName": "Gateway General"}}},
            {"name": "mr", "destinations": ["vna"], "match": {"Modality": "MR"}},
        ],
    )
    config = tmp_path / "gateway.toml"
    config.write_text(to_toml(data))
    (ct,) = make_study(tmp_path / "ct", 1, patient_id="P9")
    (mr,) = make_study(tmp_path / "mr", 1, template="MR_small.dcm")
    result = cli(config, "route-test", str(ct), str(mr), "--calling-ae", "CT01")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "routes: ct-from-ct01" in out
    assert "-> main-pacs (via ct-from-ct01)" in out and "-> vna (via ct-from-ct01)" in out
    assert "prefix PatientID: 'P9' -> 'SITEA-P9'" in out
    assert "InstitutionName" in out and "'Gateway General'" in out
    assert "routes: mr" in out
    other = cli(config, "route-test", str(ct), "--calling-ae", "CT02")
    assert "unrouted" in other.stdout
