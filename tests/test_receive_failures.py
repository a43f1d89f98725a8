"""Bad input and broken dependencies get a clear answer; nothing partial is kept."""

from __future__ import annotations

import concurrent.futures
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from copy import deepcopy
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from structlog.testing import capture_logs

from gateway.dicom.header import read_file_meta
from gateway.node import Node
from gateway.status import Status
from tests.conftest import POSTGRES_ADMIN_URL
from tests.helpers import dcmtk
from tests.helpers.data import make_study, new_uid, sample
from tests.helpers.net import wait_until
from tests.helpers.nodes import (
    FILE_SPOOL,
    SPOOLINGS,
    make_config,
    running_node,
    spooled_copies,
    wait_uploaded,
)
from tests.helpers.parrot import (
    EXPLICIT_VR_LITTLE_ENDIAN,
    Parrot,
    associate_rq,
    c_store_command,
    p_data,
)
from tests.helpers.scu import send_files

pytestmark = pytest.mark.integration


def _instance_count(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(text("SELECT count(*) FROM instance")).scalar_one())


def _spool_files(node: Node) -> list[Path]:
    return [*node.spool.incoming.iterdir(), *node.spool.ready.iterdir()]


@contextmanager
def database_down(database_url: str) -> Iterator[None]:
    """Make the index database refuse work, for real, then bring it back."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        # Another writer holds the only write lock for longer than the node waits.
        blocker = sqlite3.connect(url.database, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            yield
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        return
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = url.database
    with admin.connect() as connection:
        connection.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
        connection.execute(
            text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name"),
            {"name": name},
        )
    try:
        yield
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
        admin.dispose()


@pytest.mark.parametrize("spooling", ["index", "files"])
def test_database_unavailable_answers_out_of_resources_and_keeps_nothing(
    tmp_path: Path, database_url: str, spooling: str
) -> None:
    config = make_config(tmp_path, database_url,
                         storage={"database_timeout": 1.0, **SPOOLINGS[spooling]})
    files = make_study(tmp_path / "study", 2)
    with running_node(config) as node:
        with database_down(database_url):
            report = send_files(node.receiver.port, files[:1])
            assert report.statuses == [(report.statuses[0][0], Status.OUT_OF_RESOURCES)]
            assert _spool_files(node) == []
        assert _instance_count(node.engine) == 0
        report = send_files(node.receiver.port, files)
        assert [status for _, status in report.statuses] == [0, 0]
        wait_uploaded(node.engine, 2)


def test_spool_write_failure_answers_out_of_resources_and_keeps_nothing(
    tmp_path: Path, database_url: str
) -> None:
    # The spool's ready/ directory becomes unusable (a disk error, a mount gone):
    # making the received file durable fails, and the sender is told so.
    config = make_config(tmp_path, database_url, storage=FILE_SPOOL)
    files = make_study(tmp_path / "study", 2)
    with running_node(config) as node:
        ready = node.spool.ready
        moved = ready.with_name("ready-away")
        ready.rename(moved)
        ready.write_text("not a directory")
        with capture_logs() as logs:
            report = send_files(node.receiver.port, files[:1])
        assert report.statuses == [(report.statuses[0][0], Status.OUT_OF_RESOURCES)]
        assert any(entry["event"] == "spool_write_failed" for entry in logs)
        assert _instance_count(node.engine) == 0
        assert list(node.spool.incoming.iterdir()) == []
        ready.unlink()
        moved.rename(ready)
        report = send_files(node.receiver.port, files)
        assert [status for _, status in report.statuses] == [0, 0]
        wait_uploaded(node.engine, 2)


def test_spool_below_free_space_threshold_refuses_associations_transiently(
    tmp_path: Path, database_url: str
) -> None:
    config = make_config(tmp_path, database_url, storage={"min_free_bytes": 10**18})
    with running_node(config) as node:
        result = dcmtk.storescu(node.receiver.port, make_study(tmp_path / "study", 1))
        assert "Rejected Transient" in result.output
        assert "Temporary Congestion" in result.output or "Temporary congestion" in result.output
        assert _instance_count(node.engine) == 0
        assert _spool_files(node) == []


def test_spool_filling_up_during_an_association_answers_out_of_resources(
    tmp_path: Path, database_url: str
) -> None:
    config = make_config(tmp_path, database_url)
    files = make_study(tmp_path / "study", 2)
    with running_node(config) as node:

        def fill_disk(index: int, _uid: str, _status: int) -> None:
            if index == 0:  # the disk "fills" once the association is under way
                node.spool.min_free_bytes = 10**18
                node.spool._free_checked_at = 0.0

        report = send_files(node.receiver.port, files, on_response=fill_disk)
        assert [status for _, status in report.statuses] == [0, Status.OUT_OF_RESOURCES]
        assert "spool" in (report.error_comments[1] or "")
        wait_uploaded(node.engine, 1)
        assert _instance_count(node.engine) == 1
        assert list(node.spool.incoming.iterdir()) == []


@pytest.mark.parametrize("spooling", ["index", "files"])
def test_object_store_outage_does_not_block_receiving_and_uploads_resume(
    tmp_path: Path, database_url: str, spooling: str
) -> None:
    objects = tmp_path / "objects"
    objects.write_text("a file where the store's directory should be")  # store is unusable
    config = make_config(tmp_path, database_url, storage=SPOOLINGS[spooling])
    files = make_study(tmp_path / "study", 3)
    with running_node(config) as node:
        result = dcmtk.storescu(node.receiver.port, files)
        assert result.ok, result.output

        def failed_at_least_once() -> bool:
            with node.engine.connect() as connection:
                return bool(connection.execute(text(
                    "SELECT count(*) FROM instance WHERE state = 'spooled'"
                    " AND last_upload_error IS NOT NULL")).scalar_one())

        wait_until(failed_at_least_once, 10, message="a failed upload attempt")
        waiting = spooled_copies(node.engine, node.spool.root)
        assert waiting == ((3, 0) if spooling == "index" else (0, 3))
        objects.unlink()  # the store comes back
        wait_uploaded(node.engine, 3, timeout=30)
        # The spooled copy goes right after the row records the object.
        wait_until(lambda: spooled_copies(node.engine, node.spool.root) == (0, 0), 10,
                   message="the uploaded spooled copies deleted")


def _broken_files(directory: Path) -> dict[str, tuple[Path, int]]:
    """Part 10 files whose datasets cannot be accepted, with the expected status."""
    directory.mkdir()
    original = sample("CT_small.dcm").read_bytes()
    ds = dcmread(sample("CT_small.dcm"))
    _, offset = read_file_meta(original)
    cases: dict[str, tuple[Path, int]] = {}

    garbage = directory / "garbage.dcm"
    garbage.write_bytes(original[:offset] + bytes(range(256)) * 8)
    cases["garbage"] = (garbage, Status.CANNOT_UNDERSTAND)

    truncated = directory / "truncated.dcm"
    truncated.write_bytes(original[: offset + 301])
    cases["truncated header"] = (truncated, Status.CANNOT_UNDERSTAND)

    no_study = directory / "no_study.dcm"
    copy = deepcopy(ds)
    del copy.StudyInstanceUID
    copy.save_as(no_study)
    cases["no Study Instance UID"] = (no_study, Status.CANNOT_UNDERSTAND)

    wrong_uid = directory / "wrong_uid.dcm"
    copy = deepcopy(ds)
    copy.file_meta.MediaStorageSOPInstanceUID = new_uid()  # the command will carry this one
    copy.save_as(wrong_uid)
    cases["SOP Instance UID mismatch"] = (wrong_uid, Status.CANNOT_UNDERSTAND)

    wrong_class = directory / "wrong_class.dcm"
    copy = deepcopy(ds)
    copy.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR, dataset is CT
    copy.save_as(wrong_class)
    cases["SOP Class mismatch"] = (wrong_class, Status.DATASET_DOES_NOT_MATCH_SOP_CLASS)
    return cases


def test_malformed_datasets_get_failure_statuses_and_the_association_goes_on(
    node: Node, tmp_path: Path
) -> None:
    cases = _broken_files(tmp_path / "broken")
    good = make_study(tmp_path / "good", 1)
    paths = [path for path, _ in cases.values()] + good
    with capture_logs() as logs:
        report = send_files(node.receiver.port, paths)
    statuses = [status for _, status in report.statuses]
    expected = [int(status) for _, status in cases.values()] + [0]
    assert statuses == expected, (statuses, report.error_comments)
    assert all(report.error_comments[: len(cases)]), report.error_comments
    refused = [entry for entry in logs if entry["event"] == "instance_refused"]
    assert len(refused) == len(cases)
    assert all(entry["reason"] for entry in refused)
    wait_uploaded(node.engine, 1)
    assert _instance_count(node.engine) == 1
    assert list(node.spool.incoming.iterdir()) == []


def test_garbage_instead_of_a_pdu_closes_that_connection_only(node: Node) -> None:
    parrot = Parrot.connect(node.receiver.port)
    parrot.send(b"GET / HTTP/1.1\r\nHost: gateway\r\n\r\n")
    assert parrot.answered_with_abort()
    parrot.close()
    assert dcmtk.echoscu(node.receiver.port).ok


def test_peer_vanishing_mid_dataset_leaves_no_partial_file(file_spool_node: Node) -> None:
    node = file_spool_node
    parrot = Parrot.connect(node.receiver.port)
    parrot.send(associate_rq("MODALITY", "GATEWAY"))
    pdu = parrot.receive_pdu()
    assert pdu is not None and pdu[0] == 0x02, "association should be accepted"
    sop_uid = new_uid()
    parrot.send(p_data(1, 0b11, c_store_command("1.2.840.10008.5.1.4.1.1.2", sop_uid)))
    parrot.send(p_data(1, 0b00, b"\x08\x00\x16\x00UI\x1a\x00" + b"1.2.840.10008.5.1.4.1.1.2\x00"))
    wait_until(lambda: any(node.spool.incoming.iterdir()), 5, message="a partial reception")
    parrot.reset()
    wait_until(lambda: not any(node.spool.incoming.iterdir()), 5,
               message="the partial file to be removed")
    assert _instance_count(node.engine) == 0
    assert dcmtk.echoscu(node.receiver.port).ok


def test_unknown_pdu_type_aborts_that_association_only(node: Node) -> None:
    parrot = Parrot.connect(node.receiver.port)
    parrot.send(associate_rq("MODALITY", "GATEWAY", syntax=EXPLICIT_VR_LITTLE_ENDIAN))
    pdu = parrot.receive_pdu()
    assert pdu is not None and pdu[0] == 0x02
    parrot.send(b"\x0f\x00\x00\x00\x00\x04abcd")
    assert parrot.answered_with_abort()
    parrot.close()
    assert dcmtk.echoscu(node.receiver.port).ok


def test_concurrent_associations_are_all_stored(node: Node, tmp_path: Path) -> None:
    studies = [make_study(tmp_path / f"s{i}", 15) for i in range(4)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda files: dcmtk.storescu(node.receiver.port, files), studies))
    assert all(result.ok for result in results), [r.output for r in results if not r.ok]
    wait_uploaded(node.engine, 60)
    assert _instance_count(node.engine) == 60


def test_a_pdu_announced_beyond_the_maximum_is_refused_without_reading_it(node: Node) -> None:
    parrot = Parrot.connect(node.receiver.port)
    parrot.send(associate_rq("MODALITY", "GATEWAY"))
    pdu = parrot.receive_pdu()
    assert pdu is not None and pdu[0] == 0x02
    parrot.send(b"\x04\x00" + (1 << 31).to_bytes(4, "big") + b"\x00" * 64)  # "2 GiB" P-DATA
    assert parrot.answered_with_abort()
    parrot.close()
    assert dcmtk.echoscu(node.receiver.port).ok


def test_text_values_with_nul_bytes_are_indexed_on_every_database(
    node: Node, tmp_path: Path
) -> None:
    (path,) = make_study(tmp_path, 1)
    ds = dcmread(path)
    ds.PatientName = "DOE\x00JANE"
    ds.StudyDescription = "HEAD\x00CT"
    ds.save_as(path)
    report = send_files(node.receiver.port, [path])
    assert report.statuses[0][1] == 0
    with node.engine.connect() as connection:
        row = connection.execute(text(
            "SELECT p.patient_name, s.study_description FROM patient p"
            " JOIN study s ON s.patient_pk = p.id"
        )).one()
    assert tuple(row) == ("DOEJANE", "HEADCT")
