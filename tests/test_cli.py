"""The dicom-gateway command line, run as an admin would run it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli import parse_peer
from gateway.node import Node
from tests.helpers import dcmtk
from tests.helpers.net import free_port
from tests.helpers.nodes import config_data, to_toml

pytestmark = pytest.mark.integration


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True, text=True, check=False, timeout=timeout,
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("PACS@10.1.9.9:104", ("PACS", "10.1.9.9", 104)),
        ("PACS@pacs.example.org:11112", ("PACS", "pacs.example.org", 11112)),
        ("PACS@[::1]:104", ("PACS", "::1", 104)),
    ],
)
def test_peer_argument_parses(text: str, expected: tuple[str, str, int]) -> None:
    assert parse_peer(text) == expected


@pytest.mark.parametrize("text", ["PACS", "PACS@host", "@host:104", "PACS@host:99999",
                                  "TOO_LONG_AE_TITLE_X@h:1"])
def test_bad_peer_argument_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_peer(text)


def test_echo_succeeds_against_the_node(node: Node) -> None:
    result = _cli("echo", f"GATEWAY@127.0.0.1:{node.receiver.port}")
    assert result.returncode == 0, result.stderr
    assert "success" in result.stdout


def test_echo_succeeds_against_dcmtk_storescp(tmp_path: Path) -> None:
    with dcmtk.storescp(tmp_path / "scp", ae_title="PACS") as scp:
        result = _cli("echo", f"PACS@127.0.0.1:{scp.port}", "--calling-ae", "GATEWAY")
    assert result.returncode == 0, result.stderr


def test_echo_reports_a_rejection(node: Node) -> None:
    result = _cli("echo", f"WRONG@127.0.0.1:{node.receiver.port}")
    assert result.returncode == 1
    assert "rejected" in result.stderr


def test_echo_reports_nobody_listening() -> None:
    result = _cli("echo", f"PACS@127.0.0.1:{free_port()}", "--timeout", "3")
    assert result.returncode == 1
    assert "FAILED" in result.stderr


def test_run_reports_a_port_already_in_use(node: Node, tmp_path: Path) -> None:
    data = config_data(
        tmp_path / "second", f"sqlite:///{tmp_path / 'second.db'}", port=node.receiver.port
    )
    config = tmp_path / "second.toml"
    config.write_text(to_toml(data))
    result = _cli("run", "--config", str(config))
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{node.receiver.port}" in result.stderr


def test_run_without_a_config_explains_how_to_give_one() -> None:
    result = _cli("run")
    assert result.returncode == 2
    assert "--config" in result.stderr


def test_run_refuses_a_spool_another_node_is_using(node: Node, tmp_path: Path) -> None:
    data = config_data(tmp_path, f"sqlite:///{tmp_path / 'other.db'}", port=free_port())
    data["storage"]["spool_dir"] = str(node.config.storage.spool_dir)
    config = tmp_path / "same-spool.toml"
    config.write_text(to_toml(data))
    result = _cli("run", "--config", str(config))
    assert result.returncode == 1
    assert "is in use by another dicom-gateway process" in result.stderr
