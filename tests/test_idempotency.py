"""Re-sends: identical bytes create nothing new; changed bytes become a new version."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import text
from structlog.testing import capture_logs

from gateway.node import Node
from tests.helpers import dcmtk
from tests.helpers.data import make_study
from tests.helpers.net import wait_until
from tests.helpers.nodes import wait_uploaded

pytestmark = pytest.mark.integration


def _rows(node: Node, sql: str) -> list[tuple[object, ...]]:
    with node.engine.connect() as connection:
        return [tuple(row) for row in connection.execute(text(sql)).all()]


def _object_files(node: Node) -> list[Path]:
    root = Path(node.config.storage.object_store.removeprefix("file://"))
    return sorted(p for p in root.rglob("*.dcm") if ".tmp" not in p.parts)


def test_identical_resend_succeeds_and_creates_nothing(node: Node, tmp_path: Path) -> None:
    files = make_study(tmp_path, 3)
    assert dcmtk.storescu(node.receiver.port, files).ok
    wait_uploaded(node.engine, 3)
    with capture_logs() as logs:
        result = dcmtk.storescu(node.receiver.port, files)
    assert result.ok, result.output
    assert _rows(node, "SELECT count(*) FROM instance") == [(3,)]
    assert len(_object_files(node)) == 3
    # The spool file goes right after the row records the object.
    wait_until(lambda: list(node.spool.ready.iterdir()) == [], 10,
               message="the uploaded spool files deleted")
    assert sum(1 for e in logs if e["event"] == "instance_duplicate") == 3
    released = [e for e in logs if e["event"] == "association_released"]
    assert released[0]["duplicates"] == 3
    # The association's row is written just after its release is logged.
    wait_until(lambda: _rows(node, "SELECT duplicates FROM association ORDER BY requested_at")
               == [(0,), (3,)], 5, message="the association log to count the duplicates")


def test_changed_resend_is_recorded_as_a_new_current_version(node: Node, tmp_path: Path) -> None:
    (first,) = make_study(tmp_path / "v1", 1)
    ds = dcmread(first)
    ds.StudyDescription = "Corrected description"
    ds.PixelData = bytes(len(ds.PixelData))  # different pixels, same SOP Instance UID
    second = tmp_path / "v2.dcm"
    ds.save_as(second)

    assert dcmtk.storescu(node.receiver.port, [first]).ok
    with capture_logs() as logs:
        assert dcmtk.storescu(node.receiver.port, [second]).ok
    wait_uploaded(node.engine, 2)

    versions = _rows(
        node,
        "SELECT version, is_current, sha256, object_key FROM instance ORDER BY version",
    )
    assert [(v, bool(c)) for v, c, _, _ in versions] == [(1, False), (2, True)]
    assert versions[0][2] != versions[1][2]
    assert versions[0][3] != versions[1][3], "each version has its own object"
    assert len(_object_files(node)) == 2
    assert _rows(node, "SELECT study_description FROM study") == [("Corrected description",)]
    (event,) = [e for e in logs if e["event"] == "instance_new_version"]
    assert event["version"] == 2
    assert event["sop_instance_uid"] == str(ds.SOPInstanceUID)
    new_versions = _rows(node, "SELECT new_versions FROM association ORDER BY requested_at")
    assert new_versions == [(0,), (1,)]


def test_resend_of_an_older_version_becomes_the_newest(node: Node, tmp_path: Path) -> None:
    (first,) = make_study(tmp_path / "v1", 1)
    ds = dcmread(first)
    ds.SeriesDescription = "changed"
    second = tmp_path / "v2.dcm"
    ds.save_as(second)
    for path in (first, second, first):
        assert dcmtk.storescu(node.receiver.port, [path]).ok
    wait_uploaded(node.engine, 3)
    current = _rows(node, "SELECT version FROM instance WHERE is_current")
    assert current == [(3,)], "the newest receipt wins, even if its bytes were seen before"


def test_instances_without_patient_id_are_not_merged_into_one_patient(
    node: Node, tmp_path: Path
) -> None:
    for index, name in enumerate(["Alpha^Ann", "Beta^Bob"]):
        (path,) = make_study(tmp_path / str(index), 1, patient_id="")
        ds = dcmread(path)
        ds.PatientName = name
        ds.save_as(path)
        assert dcmtk.storescu(node.receiver.port, [path]).ok
    rows = _rows(node, "SELECT p.patient_name FROM study s JOIN patient p ON p.id = s.patient_pk"
                       " ORDER BY p.patient_name")
    assert rows == [("Alpha^Ann",), ("Beta^Bob",)]
