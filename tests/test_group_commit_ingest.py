"""Group commit in the receive path: associations storing at once share an index commit,
and each still gets its own, truthful answer (on SQLite and PostgreSQL)."""

from __future__ import annotations

import sqlite3
import threading
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.exc import DataError, OperationalError

from gateway.index import repository
from gateway.index.database import _QueuedSqliteConnection
from gateway.node import Node
from gateway.status import Status
from tests.helpers.data import make_study
from tests.helpers.faults import lose_connection_after_commit
from tests.helpers.net import wait_until
from tests.helpers.scu import SendReport, send_files

pytestmark = pytest.mark.integration

SENDERS = 4


def _count(node: Node, sql: str, **params: Any) -> int:
    with node.engine.connect() as connection:
        return int(connection.execute(text(sql), params).scalar_one())


def _batch_sizes(node: Node) -> tuple[float, float]:
    """(number of index commits, instances they acknowledged) from the metric."""
    samples = {s.name: s.value for m in node.metrics.commit_batch.collect() for s in m.samples}
    return (samples["dicom_gateway_index_commit_batch_size_count"],
            samples["dicom_gateway_index_commit_batch_size_sum"])


@pytest.fixture
def held_first_commit(node: Node, monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Holds the first batch, before it takes a connection, until the returned event is
    set, so the instances that arrive meanwhile queue for the next commit (and nothing
    else waits on the database meanwhile)."""
    group = node.ingestor._group
    original = group._run_batch
    release = threading.Event()
    first = threading.Lock()

    def held(units: Any) -> Any:
        if first.acquire(blocking=False):
            assert release.wait(30)
        return original(units)

    monkeypatch.setattr(group, "_run_batch", held)
    yield release
    release.set()


def _send_at_once(node: Node, studies: list[list[Path]], release: threading.Event,
                  ) -> list[SendReport]:
    """Each study on its own association; the first one's commit is held until all the
    others wait behind it."""
    reports: list[SendReport | None] = [None] * len(studies)

    def send(index: int) -> None:
        reports[index] = send_files(node.receiver.port, studies[index])

    threads = [threading.Thread(target=send, args=(index,), daemon=True)
               for index in range(len(studies))]
    threads[0].start()
    wait_until(lambda: node.ingestor._group._busy, 30, message="the first commit held")
    for thread in threads[1:]:
        thread.start()
    wait_until(lambda: len(node.ingestor._group._pending) == len(studies) - 1, 30,
               message="the other associations queued behind it")
    release.set()
    for thread in threads:
        thread.join(60)
        assert not thread.is_alive(), "an association did not finish"
    return [report for report in reports if report is not None]


def test_associations_storing_at_once_share_a_commit(
    node: Node, tmp_path: Path, held_first_commit: threading.Event
) -> None:
    studies = [make_study(tmp_path / f"s{index}", 1) for index in range(SENDERS)]
    reports = _send_at_once(node, studies, held_first_commit)
    assert [status for report in reports for _, status in report.statuses] == [0] * SENDERS
    assert _count(node, "SELECT count(*) FROM instance WHERE is_current") == SENDERS
    assert _batch_sizes(node) == (2, SENDERS)  # the held one, then all the others at once


REFUSALS = {
    # error raised for one record -> its status, whether its spool file is removed
    "data-error": (DataError("INSERT", {}, Exception("value too long for type")),
                   Status.CANNOT_UNDERSTAND, True),
    "operational-error": (OperationalError("SELECT", {}, Exception("index row size exceeds "
                                                                    "btree maximum")),
                          Status.OUT_OF_RESOURCES, True),
    # not the database: answered 0x0110; the file is kept (set aside at the next start)
    "bug": (RuntimeError("a bug reached by one record only"), Status.PROCESSING_FAILURE,
            False),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_a_record_the_database_refuses_fails_alone(
    node: Node, tmp_path: Path, held_first_commit: threading.Event,
    monkeypatch: pytest.MonkeyPatch, case: str,
) -> None:
    error, status, discarded = REFUSALS[case]
    studies = [make_study(tmp_path / f"s{index}", 1) for index in range(SENDERS)]
    refused_uid = _sop_uid(studies[2][0])
    held = repository.record_instance

    def refuse_one(connection: Any, record: Any, *args: Any) -> Any:
        if record.attributes.sop_instance_uid == refused_uid:
            raise error
        return held(connection, record, *args)

    monkeypatch.setattr(repository, "record_instance", refuse_one)
    reports = _send_at_once(node, studies, held_first_commit)
    statuses = {uid: code for report in reports for uid, code in report.statuses}
    assert statuses.pop(refused_uid) == status
    assert list(statuses.values()) == [0] * (SENDERS - 1)
    assert _count(node, "SELECT count(*) FROM instance WHERE is_current") == SENDERS - 1
    assert _count(node, "SELECT count(*) FROM instance WHERE sop_instance_uid = :u",
                  u=refused_uid) == 0
    if discarded:
        wait_until(lambda: len(list(node.spool.ready.iterdir())) <= SENDERS - 1, 10,
                   message="the refused instance's spool file removed")


def test_a_batch_commit_that_fails_after_reaching_the_database_loses_nothing(
    node: Node, tmp_path: Path, held_first_commit: threading.Event,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every instance of the batch is answered 0xA700 (its fate is unknown to us); the
    re-sends find the committed rows and keep exactly one copy of each."""
    lose_connection_after_commit(
        monkeypatch, lambda stack: "in _commit_batch" in stack and "in _commit_one" not in stack
    )
    studies = [make_study(tmp_path / f"s{index}", 1) for index in range(SENDERS)]
    reports = _send_at_once(node, studies, held_first_commit)
    statuses = [status for report in reports for _, status in report.statuses]
    assert statuses[0] == Status.SUCCESS  # the held one committed alone
    assert statuses[1:] == [Status.OUT_OF_RESOURCES] * (SENDERS - 1)
    for study in studies[1:]:
        assert send_files(node.receiver.port, study).statuses[0][1] == Status.SUCCESS
    assert _count(node, "SELECT count(*) FROM instance") == SENDERS


def test_a_database_that_cannot_begin_fails_the_batch_without_retrying_each_record(
    node: Node, tmp_path: Path, held_first_commit: threading.Event,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = node.ingestor.engine
    begins: list[int] = []

    def unavailable(_connection: Any) -> None:
        """The index, unreachable after the held record's transaction began."""
        begins.append(1)
        if len(begins) > 1:
            raise OperationalError("BEGIN", {}, Exception("database is locked"))

    class Unavailable:
        """The ingestor's engine: its connections fail to begin after the first time."""

        def connect(self) -> Any:
            connection = engine.connect()
            event.listen(connection, "begin", unavailable)
            return connection

    monkeypatch.setattr(node.ingestor._connection, "_engine", Unavailable())
    studies = [make_study(tmp_path / f"s{index}", 1) for index in range(SENDERS)]
    reports = _send_at_once(node, studies, held_first_commit)
    statuses = [status for report in reports for _, status in report.statuses]
    assert statuses == [Status.SUCCESS] + [Status.OUT_OF_RESOURCES] * (SENDERS - 1)
    assert len(begins) == 2  # the held record's, then the batch's: no one-by-one retries
    assert _count(node, "SELECT count(*) FROM instance") == 1


def _sop_uid(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_commits_run_on_one_kept_connection_given_back_after_a_failure(
    node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = node.ingestor.engine
    connects: list[int] = []

    class Counted:
        def connect(self) -> Any:
            connects.append(1)
            return engine.connect()

    monkeypatch.setattr(node.ingestor._connection, "_engine", Counted())
    files = make_study(tmp_path / "study", 6)
    assert [s for _, s in send_files(node.receiver.port, files[:3]).statuses] == [0, 0, 0]
    assert len(connects) == 1  # one connection, kept from the first commit to the last
    assert node.ingestor._connection._kept is not None
    # A commit that fails gives its connection back: the next one is taken afresh.
    record = repository.record_instance

    def failing(*args: Any, **kwargs: Any) -> Any:
        raise OperationalError("INSERT", {}, Exception("the database went away"))

    monkeypatch.setattr(repository, "record_instance", failing)
    report = send_files(node.receiver.port, files[3:4])
    assert report.statuses[0][1] == Status.OUT_OF_RESOURCES
    assert node.ingestor._connection._kept is None
    monkeypatch.setattr(repository, "record_instance", record)
    assert send_files(node.receiver.port, files[4:]).statuses[0][1] == 0
    assert len(connects) == 2


def test_a_batch_whose_commit_fails_gives_back_its_connection_and_the_write_lock(
    node: Node, tmp_path: Path, held_first_commit: threading.Event,
    monkeypatch: pytest.MonkeyPatch, database_url: str,
) -> None:
    # A COMMIT refused by SQLite (busy, disk full) leaves the driver in the transaction,
    # holding the database's write lock: the connection must not be kept for the next
    # batch, or every other writer would wait on that lock.
    if not database_url.startswith("sqlite"):
        pytest.skip("the SQLite driver's failed COMMIT")
    original = _QueuedSqliteConnection.commit
    armed = threading.Event()
    armed.set()

    def refused(self: _QueuedSqliteConnection) -> None:
        if armed.is_set() and any(frame.name == "_commit_together"
                                  for frame in traceback.extract_stack()):
            armed.clear()
            raise sqlite3.OperationalError("database or disk is full")
        original(self)

    monkeypatch.setattr(_QueuedSqliteConnection, "commit", refused)
    studies = [make_study(tmp_path / f"s{index}", 1) for index in range(SENDERS)]
    reports = _send_at_once(node, studies, held_first_commit)
    statuses = [status for report in reports for _, status in report.statuses]
    assert statuses == [Status.SUCCESS] + [Status.OUT_OF_RESOURCES] * (SENDERS - 1)
    assert not armed.is_set()
    # Other writers are not locked out, and the next instance is stored.
    with node.engine.begin() as connection:
        connection.execute(text("UPDATE study SET study_id = study_id"))
    assert send_files(node.receiver.port, studies[1]).statuses[0][1] == Status.SUCCESS


def test_a_kept_connection_lost_to_a_database_restart_is_replaced_unnoticed(
    node: Node, tmp_path: Path, database_url: str, postgres_admin: Any,
) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("a PostgreSQL server ending a session")
    files = make_study(tmp_path / "study", 2)
    assert send_files(node.receiver.port, files[:1]).statuses[0][1] == Status.SUCCESS
    kept = node.ingestor._connection._kept
    assert kept is not None
    pid = kept.connection.dbapi_connection.info.backend_pid
    with postgres_admin.connect() as admin:
        admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    assert send_files(node.receiver.port, files[1:]).statuses[0][1] == Status.SUCCESS
    assert _count(node, "SELECT count(*) FROM instance") == 2
