"""The C-STORE lane on a running node: plain C-STOREs served on the DUL thread,
everything else left to pynetdicom, protocol errors aborting only their association."""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pynetdicom
import pytest
from pydicom import dcmread
from sqlalchemy import text

from gateway import store_lane
from gateway.dimse_codec import file_meta_bytes
from gateway.ingest import Ingestor, ReceivedInstance, Sender, StoreResult
from gateway.node import Node
from gateway.receiver import Receiver
from gateway.status import Status
from gateway.store_lane import StoreLane
from tests.helpers import dcmtk
from tests.helpers.data import dataset_bytes, make_study, new_uid
from tests.helpers.net import wait_until
from tests.helpers.nodes import make_config, running_node, wait_uploaded
from tests.helpers.parrot import (
    CT_IMAGE_STORAGE,
    EXPLICIT_VR_LITTLE_ENDIAN,
    Parrot,
    associate_rq,
    c_echo_command,
    c_store_command,
    p_data,
    p_data_items,
)
from tests.helpers.scu import send_files

pytestmark = pytest.mark.integration


@pytest.fixture
def lane_counts(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """How many C-STOREs the lane and pynetdicom's C-STORE event each served."""
    counts = {"lane": 0, "pynetdicom": 0}
    finish, on_c_store = StoreLane._finish, Receiver._on_c_store

    def counted_finish(self: StoreLane, *args: Any) -> None:
        counts["lane"] += 1
        finish(self, *args)

    def counted_on_c_store(self: Receiver, event: Any) -> Any:
        counts["pynetdicom"] += 1
        return on_c_store(self, event)

    monkeypatch.setattr(StoreLane, "_finish", counted_finish)
    monkeypatch.setattr(Receiver, "_on_c_store", counted_on_c_store)
    yield counts


def _instances(node: Node) -> list[str]:
    with node.engine.connect() as connection:
        return sorted(connection.execute(
            text("SELECT sop_instance_uid FROM instance")).scalars())


def _associate(node: Node, **kwargs: Any) -> Parrot:
    """An association from a raw peer, established. A message that arrives while the
    listener is still accepting (writing the association's log row) is pynetdicom's, as
    its association thread serves nothing before that either: a C-ECHO answered shows
    the association is established, so the lane takes what follows."""
    parrot = Parrot.connect(node.receiver.port)
    parrot.send(associate_rq("MODALITY", "GATEWAY", **kwargs))
    pdu = parrot.receive_pdu()
    assert pdu is not None and pdu[0] == 0x02, "association should be accepted"
    parrot.send(p_data(1, 0b11, c_echo_command()))
    assert parrot.receive_command().Status == 0x0000
    return parrot


def _study(tmp_path: Path, count: int) -> list[tuple[str, bytes]]:
    """(SOP Instance UID, encoded data set) of *count* CT instances."""
    files = make_study(tmp_path / "study", count)
    return [(_sop_instance(path), dataset_bytes(path)) for path in files]


def _sop_instance(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_storescu_instances_are_served_by_the_lane(
    lane_counts: dict[str, int], node: Node, tmp_path: Path
) -> None:
    files = make_study(tmp_path, 5)
    result = dcmtk.storescu(node.receiver.port, files)
    assert result.ok, result.output
    assert len(_instances(node)) == 5
    assert lane_counts == {"lane": 5, "pynetdicom": 0}
    assert not any(node.spool.incoming.iterdir())


def test_an_association_per_instance_takes_the_lane_too(
    lane_counts: dict[str, int], node: Node, tmp_path: Path
) -> None:
    # The C-STORE arrives while the listener is still writing the association's log row
    # (pynetdicom has sent the A-ASSOCIATE-AC but not yet called it established).
    for path in make_study(tmp_path, 3):
        result = dcmtk.storescu(node.receiver.port, [path])
        assert result.ok, result.output
    assert lane_counts == {"lane": 3, "pynetdicom": 0}
    assert len(_instances(node)) == 3


def test_data_sets_split_over_many_pdus_are_written_whole(
    tmp_path: Path, database_url: str, lane_counts: dict[str, int]
) -> None:
    # The smallest maximum PDU the node allows: storescu splits each 39 KB instance.
    # DCMTK storescp in bit-preserving mode is the oracle for what was on the wire.
    config = make_config(tmp_path, database_url, node={"max_pdu_length": 4096})
    files = make_study(tmp_path / "study", 4)
    with running_node(config) as node, dcmtk.storescp(tmp_path / "oracle") as oracle:
        for port, called in ((node.receiver.port, "GATEWAY"), (oracle.port, oracle.ae_title)):
            result = dcmtk.storescu(port, files, called=called)
            assert result.ok, result.output
        assert lane_counts == {"lane": 4, "pynetdicom": 0}
        wait_uploaded(node.engine, 4)
        with node.engine.connect() as connection:
            keys = dict(connection.execute(
                text("SELECT sop_instance_uid, object_key FROM instance")).all())
        root = Path(node.config.storage.object_store.removeprefix("file://"))
        received = {path.name.split(".", 1)[1]: path for path in oracle.files()}
    assert sorted(keys) == sorted(received)
    for uid, key in keys.items():
        assert dataset_bytes(root / key) == dataset_bytes(received[uid]), uid


def test_messages_outside_the_plain_shape_go_to_pynetdicom_on_the_same_association(
    lane_counts: dict[str, int], node: Node, tmp_path: Path
) -> None:
    (first, first_data), (second, second_data), (third, third_data) = _study(tmp_path, 3)
    parrot = _associate(node)
    # A command set in two fragments: pynetdicom assembles it.
    command = c_store_command(CT_IMAGE_STORAGE, first, 1)
    parrot.send(p_data(1, 0b01, command[:20]))
    parrot.send(p_data(1, 0b11, command[20:]))
    parrot.send(p_data(1, 0b10, first_data))
    assert parrot.receive_command().Status == 0x0000
    # A plain one, with its command and data in one PDU: the lane.
    parrot.send(p_data_items((1, 0b11, c_store_command(CT_IMAGE_STORAGE, second, 2)),
                             (1, 0b00, second_data[:100]), (1, 0b10, second_data[100:])))
    response = parrot.receive_command()
    assert (response.Status, response.MessageIDBeingRespondedTo) == (0x0000, 2)
    # A C-ECHO between two C-STOREs.
    parrot.send(p_data(1, 0b11, c_echo_command()))
    assert parrot.receive_command().Status == 0x0000
    parrot.send(p_data(1, 0b11, c_store_command(CT_IMAGE_STORAGE, third, 3)))
    parrot.send(p_data(1, 0b10, third_data))
    assert parrot.receive_command().Status == 0x0000
    parrot.close()
    assert _instances(node) == sorted([first, second, third])
    assert lane_counts == {"lane": 2, "pynetdicom": 1}


@pytest.mark.parametrize(("case", "bad_pdv"), [
    ("a command fragment inside a data set", (1, 0b11, b"\x00\x00\x00\x00")),
    ("a data fragment for another context", (3, 0b10, b"\x08\x00")),
])
def test_a_protocol_error_inside_a_data_set_aborts_that_association_only(
    node: Node, tmp_path: Path, case: str, bad_pdv: tuple[int, int, bytes]
) -> None:
    ((uid, data),) = _study(tmp_path, 1)
    parrot = _associate(node)
    parrot.send(p_data(1, 0b11, c_store_command(CT_IMAGE_STORAGE, uid)))
    parrot.send(p_data(1, 0b00, data[:200]))
    parrot.send(p_data_items(bad_pdv))
    assert parrot.answered_with_abort()
    parrot.close()
    assert _instances(node) == []
    assert not any(node.spool.incoming.iterdir())
    assert dcmtk.echoscu(node.receiver.port).ok


def test_a_refusal_carries_its_error_comment(node: Node, tmp_path: Path) -> None:
    ((_, data),) = _study(tmp_path, 1)
    parrot = _associate(node)
    parrot.send(p_data(1, 0b11, c_store_command(CT_IMAGE_STORAGE, new_uid(), 4)))
    parrot.send(p_data(1, 0b10, data))
    response = parrot.receive_command()
    assert response.Status == int(Status.CANNOT_UNDERSTAND)
    assert response.ErrorComment == (
        "SOP Instance UID in the dataset differs from the C-STORE request")
    assert response.MessageIDBeingRespondedTo == 4
    parrot.close()
    assert _instances(node) == []


def test_a_peer_accepting_only_tiny_pdus_gets_its_response_in_fragments(
    lane_counts: dict[str, int], node: Node, tmp_path: Path
) -> None:
    ((uid, data),) = _study(tmp_path, 1)
    parrot = _associate(node, max_length=64)  # smaller than the response command set
    parrot.send(p_data(1, 0b11, c_store_command(CT_IMAGE_STORAGE, uid)))
    parrot.send(p_data(1, 0b10, data))
    response = parrot.receive_command()
    assert (response.Status, response.AffectedSOPInstanceUID) == (0x0000, uid)
    parrot.close()
    assert lane_counts["lane"] == 1
    assert _instances(node) == [uid]


def _part10(uid: str, data: bytes) -> bytes:
    """The Part 10 object the lane makes of a C-STORE of *data* on the parrot's context."""
    return store_lane._PREAMBLE + file_meta_bytes(
        sop_class_uid=CT_IMAGE_STORAGE, sop_instance_uid=uid,
        transfer_syntax=EXPLICIT_VR_LITTLE_ENDIAN,
        implementation_uid=pynetdicom.PYNETDICOM_IMPLEMENTATION_UID,
        implementation_version=pynetdicom.PYNETDICOM_IMPLEMENTATION_VERSION,
    ) + data


@pytest.mark.parametrize(("limit", "in_memory"), [
    ("the object's size", True),
    ("one byte less", False),
    ("the file meta group and 300 bytes", False),
    ("0", False),
])
def test_an_object_is_held_in_memory_up_to_the_limit_and_continued_in_a_file_beyond(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch,
    limit: str, in_memory: bool,
) -> None:
    ((uid, data),) = _study(tmp_path, 1)
    expected = _part10(uid, data)
    header = len(expected) - len(data)
    limits = {"the object's size": len(expected), "one byte less": len(expected) - 1,
              "the file meta group and 300 bytes": header + 300, "0": 0}
    received: list[ReceivedInstance] = []
    store = Ingestor.store

    def recorded(self: Ingestor, instance: ReceivedInstance, sender: Sender) -> StoreResult:
        received.append(instance)
        return store(self, instance, sender)

    monkeypatch.setattr(Ingestor, "store", recorded)
    config = make_config(tmp_path, database_url,
                         storage={"spool_in_index_max_bytes": limits[limit]})
    with running_node(config) as node:
        parrot = _associate(node)
        parrot.send(p_data(1, 0b11, c_store_command(CT_IMAGE_STORAGE, uid)))
        for start, end in ((0, 200), (200, 500), (500, len(data))):
            parrot.send(p_data(1, 0b10 if end == len(data) else 0b00, data[start:end]))
        assert parrot.receive_command().Status == 0x0000
        parrot.close()
        (instance,) = received
        assert instance.dataset_offset == header
        # Computed as the fragments arrived, in memory or on the way to the file.
        assert instance.digests == (hashlib.sha256(data).hexdigest(), None)
        if in_memory:
            assert (instance.path, bytes(instance.content or b"")) == (None, expected)
        else:
            assert instance.content is None and instance.path is not None
        wait_uploaded(node.engine, 1)
        with node.engine.connect() as connection:
            key = connection.execute(text("SELECT object_key FROM instance")).scalar_one()
        root = Path(node.config.storage.object_store.removeprefix("file://"))
        assert (root / key).read_bytes() == expected
        assert not any(node.spool.incoming.iterdir())


def test_a_file_that_cannot_be_created_when_the_object_outgrows_memory_is_answered(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    (failing, failing_data), (stored, stored_data) = _study(tmp_path, 2)
    create = store_lane._create
    calls = {"count": 0}

    def disk_full_once(directory: Path) -> tuple[int, Path]:
        calls["count"] += 1
        if calls["count"] == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return create(directory)

    monkeypatch.setattr(store_lane, "_create", disk_full_once)
    config = make_config(tmp_path, database_url, storage={"spool_in_index_max_bytes": 1000})
    with running_node(config) as node:
        parrot = _associate(node)
        parrot.send(p_data(1, 0b11, c_store_command(CT_IMAGE_STORAGE, failing, 1)))
        parrot.send(p_data(1, 0b00, failing_data[:300]))
        parrot.send(p_data(1, 0b10, failing_data[300:]))
        response = parrot.receive_command()
        assert (response.Status, response.ErrorComment) == (0xA700, "spool write failed")
        parrot.send(p_data(1, 0b11, c_store_command(CT_IMAGE_STORAGE, stored, 2)))
        parrot.send(p_data(1, 0b10, stored_data))
        assert parrot.receive_command().Status == 0x0000
        parrot.close()
        assert _instances(node) == [stored]
        assert not any(node.spool.incoming.iterdir())


def test_the_kernel_is_asked_to_write_a_spool_file_out_while_it_still_arrives(
    file_spool_node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fdatasync before the answer then waits for less: each request comes once
    # another WRITEBACK_BYTES are in the file, never for the same bytes twice.
    node = file_spool_node
    monkeypatch.setattr(store_lane, "WRITEBACK_BYTES", 8192)
    requests: list[int] = []
    start_writeback = store_lane.start_writeback

    def recorded(fd: int) -> None:
        requests.append(os.fstat(fd).st_size)
        start_writeback(fd)

    monkeypatch.setattr(store_lane, "start_writeback", recorded)
    (uid, data), = _study(tmp_path, 1)
    parrot = _associate(node)
    parrot.send(p_data(1, 0b11, c_store_command(CT_IMAGE_STORAGE, uid, 1)))
    fragments = [data[start:start + 4096] for start in range(0, len(data), 4096)]
    for fragment in fragments[:-1]:
        parrot.send(p_data(1, 0b00, fragment))
    parrot.send(p_data(1, 0b10, fragments[-1]))
    assert parrot.receive_command().Status == 0x0000
    parrot.close()
    assert len(requests) == len(data) // 8192
    assert requests == sorted(set(requests))
    assert all(later - earlier >= 8192 for earlier, later in itertools.pairwise(requests))
    assert _instances(node) == [uid]


def test_a_spool_write_failing_mid_data_set_is_answered_and_the_association_goes_on(
    file_spool_node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = file_spool_node
    (failing, failing_data), (stored, stored_data) = _study(tmp_path, 2)
    write_all = store_lane._write_all
    calls = {"count": 0}

    def disk_full_once(fd: int, data: Any) -> None:
        calls["count"] += 1
        if calls["count"] == 2:  # the first data fragment, after the file meta group
            raise OSError(errno.ENOSPC, "No space left on device")
        write_all(fd, data)

    monkeypatch.setattr(store_lane, "_write_all", disk_full_once)
    parrot = _associate(node)
    parrot.send(p_data(1, 0b11, c_store_command(CT_IMAGE_STORAGE, failing, 1)))
    parrot.send(p_data(1, 0b00, failing_data[:300]))
    parrot.send(p_data(1, 0b10, failing_data[300:]))
    response = parrot.receive_command()
    assert (response.Status, response.ErrorComment) == (0xA700, "spool write failed")
    assert not any(node.spool.incoming.iterdir())
    parrot.send(p_data(1, 0b11, c_store_command(CT_IMAGE_STORAGE, stored, 2)))
    parrot.send(p_data(1, 0b10, stored_data))
    assert parrot.receive_command().Status == 0x0000
    parrot.close()
    assert _instances(node) == [stored]


def test_an_unexpected_error_in_storing_is_answered_like_pynetdicom_does(
    node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ((uid, data),) = _study(tmp_path, 1)
    attach = store_lane.attach

    def broken(received: Any) -> tuple[int, str | None]:
        raise RuntimeError("a bug")

    def attach_broken(assoc: Any, lane: StoreLane) -> bool:
        lane.serve = broken
        return attach(assoc, lane)

    monkeypatch.setattr(store_lane, "attach", attach_broken)
    parrot = _associate(node)
    parrot.send(p_data(1, 0b11, c_store_command(CT_IMAGE_STORAGE, uid)))
    parrot.send(p_data(1, 0b10, data))
    assert parrot.receive_command().Status == 0xC211
    parrot.close()
    assert not any(node.spool.incoming.iterdir())


def test_a_pynetdicom_scu_gets_every_status_and_comment(node: Node, tmp_path: Path) -> None:
    files = make_study(tmp_path, 2)
    report = send_files(node.receiver.port, files)
    assert [status for _, status in report.statuses] == [0, 0]
    assert report.error_comments == [None, None]


def test_message_ids_are_echoed_over_a_long_association(node: Node, tmp_path: Path) -> None:
    instances = _study(tmp_path, 3)
    parrot = _associate(node)
    for message_id, (uid, data) in zip((1, 300, 65535), instances, strict=True):
        parrot.send(p_data(1, 0b11, c_store_command(CT_IMAGE_STORAGE, uid, message_id)))
        parrot.send(p_data(1, 0b10, data))
        response = parrot.receive_command()
        assert (response.MessageIDBeingRespondedTo, response.AffectedSOPInstanceUID,
                response.AffectedSOPClassUID) == (message_id, uid, CT_IMAGE_STORAGE)
    parrot.close()



@contextmanager
def _held_store(node: Node, count: int = 1) -> Iterator[tuple[threading.Event, threading.Event]]:
    """The first *count* instances the node stores wait until the test lets them go.
    Yields (storing: one is waiting, release)."""
    storing, release = threading.Event(), threading.Event()
    store = node.receiver.ingestor.store
    held = {"left": count}

    def held_store(received: ReceivedInstance, sender: Sender) -> StoreResult:
        if held["left"] > 0:
            held["left"] -= 1
            storing.set()
            release.wait(30)
        return store(received, sender)

    node.receiver.ingestor.store = held_store  # type: ignore[method-assign]
    try:
        yield storing, release
    finally:
        release.set()


def test_stopping_aborts_at_once_and_lets_an_instance_being_stored_finish(
    node: Node, tmp_path: Path
) -> None:
    ((uid, data),) = _study(tmp_path, 1)
    parrot = _associate(node)
    with _held_store(node) as (storing, release):
        parrot.send(p_data(1, 0b11, c_store_command(CT_IMAGE_STORAGE, uid)))
        parrot.send(p_data(1, 0b10, data))
        assert storing.wait(10)
        timer = threading.Timer(3.0, release.set)  # beyond the 2 s the aborts get
        timer.start()
        started = time.monotonic()
        node.receiver.stop(0.1)
        took, released_first = time.monotonic() - started, release.is_set()
        timer.join()
        # The association was aborted without waiting for the storage call (an abort
        # waits for the DUL thread that is making it) ...
        assert parrot.answered_with_abort()
        # ... but the stop returned only once it had finished: what the node closes
        # next (spool, index) does not go away under it. The received file was the
        # storage call's: the abort did not delete it, so the instance is durable and
        # indexed, though never acknowledged.
        assert released_first and took < 10
        assert _instances(node) == [uid]
    parrot.close()
    assert not any(node.spool.incoming.iterdir())


def test_a_response_never_overtakes_the_one_pynetdicom_queued_before_it(
    node: Node, tmp_path: Path
) -> None:
    instances = _study(tmp_path, 5)
    parrot = _associate(node)
    for message_id, (uid, data) in enumerate(instances, start=2):
        # A C-ECHO (pynetdicom's) and, without waiting for its response, a C-STORE
        # whose command and data share one PDU (the lane's).
        parrot.send(p_data(1, 0b11, c_echo_command()) + p_data_items(
            (1, 0b11, c_store_command(CT_IMAGE_STORAGE, uid, message_id)), (1, 0b10, data)))
        first, second = parrot.receive_command(), parrot.receive_command()
        assert (first.CommandField, second.CommandField) == (0x8030, 0x8001)
        assert (second.MessageIDBeingRespondedTo, second.Status) == (message_id, 0)
    parrot.close()
    assert _instances(node) == sorted(uid for uid, _ in instances)


def test_the_idle_timeout_does_not_cut_a_slow_store(tmp_path: Path, database_url: str) -> None:
    config = make_config(tmp_path, database_url, node={"network_timeout": 1.0})
    ((uid, data),) = _study(tmp_path, 1)
    with running_node(config) as node:
        parrot = _associate(node)
        with _held_store(node) as (storing, release):
            parrot.send(p_data(1, 0b11, c_store_command(CT_IMAGE_STORAGE, uid)))
            parrot.send(p_data(1, 0b10, data))
            assert storing.wait(10)
            time.sleep(2.5)  # beyond the 1 s network timeout
            release.set()
            assert parrot.receive_command().Status == 0x0000
        parrot.close()
        assert _instances(node) == [uid]


def test_a_peer_not_waiting_for_responses_gets_them_in_order(
    lane_counts: dict[str, int], node: Node, tmp_path: Path
) -> None:
    (first, first_data), (second, second_data) = _study(tmp_path, 2)
    parrot = _associate(node)
    with _held_store(node) as (storing, release):
        # The first goes to pynetdicom (its command set is split) and is held there ...
        command = c_store_command(CT_IMAGE_STORAGE, first, 1)
        parrot.send(p_data(1, 0b01, command[:20]))
        parrot.send(p_data(1, 0b11, command[20:]))
        parrot.send(p_data(1, 0b10, first_data))
        assert storing.wait(10)
        # ... while the second, plain one arrives without waiting for its response.
        parrot.send(p_data(1, 0b11, c_store_command(CT_IMAGE_STORAGE, second, 2)))
        parrot.send(p_data(1, 0b10, second_data))
        time.sleep(0.5)
        release.set()
        responses = [parrot.receive_command(), parrot.receive_command()]
    assert [(r.MessageIDBeingRespondedTo, r.Status) for r in responses] == [(1, 0), (2, 0)]
    parrot.close()
    assert _instances(node) == sorted([first, second])
    assert lane_counts == {"lane": 0, "pynetdicom": 2}


@pytest.mark.parametrize("ending", ["A-ABORT", "A-RELEASE-RQ", "reset"])
def test_an_association_ending_mid_data_set_leaves_no_partial_file(
    file_spool_node: Node, tmp_path: Path, ending: str
) -> None:
    node = file_spool_node
    ((uid, data),) = _study(tmp_path, 1)
    parrot = _associate(node)
    parrot.send(p_data(1, 0b11, c_store_command(CT_IMAGE_STORAGE, uid)))
    parrot.send(p_data(1, 0b00, data[:500]))
    wait_until(lambda: any(node.spool.incoming.iterdir()), 5, message="a partial reception")
    if ending == "A-ABORT":
        parrot.send(b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00")
    elif ending == "A-RELEASE-RQ":
        parrot.send(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")
        parrot.receive_pdu()  # the A-RELEASE-RP
    else:
        parrot.reset()
    wait_until(lambda: not any(node.spool.incoming.iterdir()), 5,
               message="the partial file to be removed")
    if ending != "reset":
        parrot.close()
    assert _instances(node) == []
    assert dcmtk.echoscu(node.receiver.port).ok
