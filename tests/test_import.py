"""``dicom-gateway import``: files and folders through the running node's pipeline."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from sqlalchemy import text

from gateway.config import GatewayConfig
from gateway.importer import scan
from tests.helpers import dcmtk
from tests.helpers.data import make_study, sample
from tests.helpers.net import free_port, wait_until
from tests.helpers.nodes import config_data, running_node, to_toml


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "import", "--config", str(config), *args],
        capture_output=True, text=True, timeout=300, check=False,
    )


def _corrupt_files(folder: Path) -> dict[str, str]:
    """Files that cannot be imported, and words of the reason each must get."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text("not an image\n" * 20)
    (folder / "tiny.dcm").write_bytes(b"DICM")
    garbage = bytearray(sample("CT_small.dcm").read_bytes())
    garbage[132:400] = b"\xff" * 268  # the file meta group is destroyed
    (folder / "broken-meta.dcm").write_bytes(bytes(garbage))
    incomplete = dcmread(sample("CT_small.dcm"))
    del incomplete.StudyInstanceUID
    incomplete.save_as(folder / "no-study-uid.dcm", enforce_file_format=True)
    shutil.copy(sample("dicomdirtests/DICOMDIR"), folder / "DICOMDIR")
    return {
        "notes.txt": "not a DICOM Part 10 file",
        "tiny.dcm": "too short",
        "broken-meta.dcm": "file meta lacks",
        "no-study-uid.dcm": "refused by the node: 0xC000 (cannot understand): cannot read "
                            "dataset: StudyInstanceUID is missing",
        "DICOMDIR": "DICOMDIR",
    }


def _node_files(tmp_path: Path, database_url: str, **sections: Any) -> tuple[Path, dict[str, Any]]:
    data = config_data(tmp_path / "gw", database_url, port=free_port(), **sections)
    path = tmp_path / "gateway.toml"
    path.write_text(to_toml(data))
    return path, data


@pytest.mark.integration
def test_import_of_good_duplicate_and_corrupt_files_then_a_safe_rerun(
    tmp_path: Path, database_url: str
) -> None:
    folder = tmp_path / "import"
    good = make_study(folder / "study", 4, patient_id="PAT-IMP", accession_number="ACC-IMP")
    (folder / "copies").mkdir()
    shutil.copy(good[0], folder / "copies" / "same-as-first.dcm")
    reasons = _corrupt_files(folder / "junk")
    with dcmtk.storescp(tmp_path / "pacs", ae_title="PEER") as pacs:
        path, data = _node_files(
            tmp_path, database_url,
            destination=[{"name": "pacs", "ae_title": "PEER", "host": "127.0.0.1",
                          "port": pacs.port}],
            route=[{"name": "ct", "destinations": ["pacs"], "match": {"Modality": "CT"}}],
        )
        with running_node(GatewayConfig.model_validate(data)) as node:
            # a pre-existing copy: the import must recognise it as already stored
            assert dcmtk.storescu(node.receiver.port, good[1:2]).ok

            first = _cli(path, str(folder))
            assert first.returncode == 3, first.stderr
            out = first.stdout
            assert "imported     3" in out
            # the copy, and the instance a modality sent before (encoded differently)
            assert "duplicates   2" in out
            assert "1 with other content" in out
            assert f"failed       {len(reasons)}" in out
            for name, words in reasons.items():
                line = next(line for line in out.splitlines() if line.strip().startswith(
                    str(folder / "junk" / name)))
                assert words in line, line
            assert "files" in first.stderr  # the progress report

            # the same pipeline as received instances: indexed, stored, routed, forwarded
            wait_until(lambda: len(pacs.files()) == 4, 30, message="forwarded to pacs")
            with node.engine.connect() as connection:
                rows = connection.execute(text(
                    "SELECT calling_ae, count(*) FROM instance GROUP BY calling_ae")).all()
            assert dict(rows) == {"STORESCU": 1, "GATEWAY": 3}

            again = _cli(path, str(folder))
            assert "imported     0" in again.stdout
            assert "duplicates   5" in again.stdout
            assert again.returncode == 3  # the unreadable files are still reported


@pytest.mark.integration
def test_import_says_clearly_when_the_node_is_not_running(
    tmp_path: Path, database_url: str
) -> None:
    path, _ = _node_files(tmp_path, database_url)
    files = make_study(tmp_path / "s", 1)
    result = _cli(path, str(files[0]))
    assert result.returncode == 1
    assert "is it running?" in result.stderr
    assert "run it again" in result.stderr


def test_import_of_a_missing_path_is_a_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(to_toml(config_data(tmp_path, f"sqlite:///{tmp_path / 'i.db'}")))
    result = _cli(path, str(tmp_path / "no-such-folder"))
    assert result.returncode == 2
    assert "no such file or folder" in result.stderr


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("CT_small.dcm", None),
        ("MR_small.dcm", None),
        ("JPEG2000.dcm", None),
        ("no_meta.dcm", "not a DICOM Part 10 file (no DICM prefix)"),
        ("meta_missing_tsyntax.dcm",
         "file meta lacks the SOP class, SOP instance or transfer syntax UID"),
        ("dicomdirtests/DICOMDIR", "a DICOMDIR (media directory), not an instance"),
        ("README.txt", "not a DICOM Part 10 file (no DICM prefix)"),
    ],
)
def test_scan_reads_identity_and_digest_or_says_why_not(name: str, expected: str | None) -> None:
    found = scan(sample(name))
    if expected is None:
        assert not isinstance(found, str), found
        meta = dcmread(sample(name), stop_before_pixels=True).file_meta
        assert found.sop_instance_uid == meta.MediaStorageSOPInstanceUID
        assert found.transfer_syntax_uid == meta.TransferSyntaxUID
        assert len(found.sha256) == 64
    else:
        assert found == expected
