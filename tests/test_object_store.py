"""Object store backends: file:// and S3 (against a real SeaweedFS server)."""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from gateway.config import StorageConfig
from gateway.dicom.header import read_file_meta
from gateway.objectstore import (
    ExpectedContent,
    ObjectStore,
    ObjectStoreError,
    ObjectVerificationError,
    Upload,
    filestore,
    object_key,
    open_object_store,
)
from gateway.objectstore.filestore import FileObjectStore
from tests.helpers import dcmtk
from tests.helpers.data import dataset_bytes, make_study
from tests.helpers.net import free_port, wait_until
from tests.helpers.nodes import (
    SPOOLINGS,
    make_config,
    running_node,
    spooled_copies,
    wait_uploaded,
)
from tests.helpers.s3 import ACCESS_KEY, SECRET_KEY, SeaweedS3, seaweed
from tests.helpers.scu import send_files

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    with seaweed(tmp_path_factory.mktemp("seaweed") / "data") as server:
        yield server


@pytest.fixture
def s3_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DICOM_GATEWAY_S3_ACCESS_KEY", ACCESS_KEY)
    monkeypatch.setenv("DICOM_GATEWAY_S3_SECRET_KEY", SECRET_KEY)


def _s3_config(server: SeaweedS3, bucket: str) -> StorageConfig:
    return StorageConfig(
        object_store=f"s3://{bucket}/archive",
        s3={"endpoint": server.endpoint, "secure": False, "create_bucket": True},
    )


def _payload(tmp_path: Path, size: int, offset: int = 300) -> tuple[Path, ExpectedContent]:
    data = os.urandom(size)
    path = tmp_path / f"object-{size}"
    path.write_bytes(data)
    return path, ExpectedContent(size, offset, hashlib.sha256(data[offset:]).hexdigest())


@pytest.fixture(params=["file", "s3"])
def store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> ObjectStore:
    if request.param == "file":
        return FileObjectStore(tmp_path / "objects")
    server: SeaweedS3 = request.getfixturevalue("s3_server")
    request.getfixturevalue("s3_credentials")
    backend = open_object_store(_s3_config(server, f"unit-{os.urandom(4).hex()}"))
    backend.check()
    return backend


@pytest.mark.parametrize("size", [1000, 12 * 1024 * 1024], ids=["single-part", "multipart"])
def test_put_file_stores_and_verifies_the_bytes(
    store: ObjectStore, tmp_path: Path, size: int
) -> None:
    path, expected = _payload(tmp_path, size)
    store.put_file("study/series/sop/abc.dcm", path, expected)
    assert store.size("study/series/sop/abc.dcm") == size
    with store.open("study/series/sop/abc.dcm") as stream:
        assert stream.read() == path.read_bytes()


def test_put_file_refuses_content_that_differs_from_the_index(
    store: ObjectStore, tmp_path: Path
) -> None:
    path, expected = _payload(tmp_path, 5000)
    wrong = ExpectedContent(expected.size, expected.dataset_offset, "0" * 64)
    with pytest.raises(ObjectVerificationError):
        store.put_file("k/v.dcm", path, wrong)


def test_missing_object_has_no_size(store: ObjectStore) -> None:
    assert store.size("no/such/object.dcm") is None


@pytest.mark.parametrize("key", [
    "../escape.dcm", "a/../../escape.dcm", "/etc/escape.dcm", "", ".", "a/..",
    "../objects-sibling/x.dcm",
])
def test_file_store_rejects_keys_that_leave_its_root(tmp_path: Path, key: str) -> None:
    store = FileObjectStore(tmp_path / "objects")
    path, expected = _payload(tmp_path, 100)
    with pytest.raises(ValueError, match="leaves the store"):
        store.put_file(key, path, expected)
    assert not (tmp_path / "escape.dcm").exists()


@pytest.mark.parametrize("key", ["1.2.3/4.5/6..7.dcm", "a/./b.dcm", "a/b/../c.dcm"])
def test_file_store_keeps_keys_inside_its_root(tmp_path: Path, key: str) -> None:
    store = FileObjectStore(tmp_path / "objects")
    path, expected = _payload(tmp_path, 100)
    store.put_file(key, path, expected)
    local = store.local_path(key)
    assert local is not None and local.is_relative_to(tmp_path / "objects")
    assert store.size(key) == 100


def test_unreachable_s3_store_raises_a_transient_error(tmp_path: Path) -> None:
    config = StorageConfig(
        object_store="s3://dicom", s3={"endpoint": f"127.0.0.1:{free_port()}", "secure": False}
    )
    backend = open_object_store(config)
    with pytest.raises(ObjectStoreError):
        backend.check()
    path, expected = _payload(tmp_path, 100)
    with pytest.raises(ObjectStoreError):
        backend.put_file("a/b.dcm", path, expected)


@pytest.mark.usefixtures("s3_credentials")
def test_node_uploads_to_s3_under_uid_keys(
    s3_server: SeaweedS3, tmp_path: Path, database_url: str
) -> None:
    bucket = f"node-{os.urandom(4).hex()}"
    storage = _s3_config(s3_server, bucket).model_dump(mode="json")
    config = make_config(tmp_path, database_url, storage={**storage, "spool_dir": str(
        tmp_path / "spool"), "database": database_url, "min_free_bytes": 0})
    files = make_study(tmp_path / "study", 3, patient_id="PAT-S3")
    with running_node(config) as node:
        # pynetdicom streams the files' dataset bytes unchanged (DCMTK re-encodes them).
        report = send_files(node.receiver.port, files)
        assert [status for _, status in report.statuses] == [0, 0, 0]
        wait_uploaded(node.engine, 3)
        with node.engine.connect() as connection:
            keys = [k for (k,) in connection.execute(text("SELECT object_key FROM instance"))]
    client = s3_server.client()
    names = sorted(o.object_name for o in client.list_objects(bucket, recursive=True))
    assert names == sorted(f"archive/{key}" for key in keys)
    assert all("PAT-S3" not in name for name in names)
    stored = {dataset_bytes_of(client.get_object(bucket, name).read()) for name in names}
    assert stored == {dataset_bytes(path) for path in files}


def dataset_bytes_of(data: bytes) -> bytes:
    _, offset = read_file_meta(data)
    return data[offset:]


@pytest.mark.usefixtures("s3_credentials")
@pytest.mark.parametrize("spooling", ["index", "files"])
def test_s3_outage_keeps_instances_in_the_spool_until_it_returns(
    tmp_path: Path, database_url: str, spooling: str
) -> None:
    with seaweed(tmp_path / "seaweed") as server:
        bucket = "outage"
        storage = _s3_config(server, bucket).model_dump(mode="json")
        config = make_config(tmp_path, database_url, storage={**storage, "spool_dir": str(
            tmp_path / "spool"), "database": database_url, "min_free_bytes": 0,
            "upload_retry": {"initial_seconds": 0.2, "max_seconds": 1.0},
            **SPOOLINGS[spooling]})
        with running_node(config) as node:
            assert dcmtk.storescu(node.receiver.port, make_study(tmp_path / "a", 2)).ok
            wait_uploaded(node.engine, 2)
            server.stop()
            result = dcmtk.storescu(node.receiver.port, make_study(tmp_path / "b", 3))
            assert result.ok, "receiving must not depend on the object store"

            def attempted() -> bool:
                with node.engine.connect() as connection:
                    return bool(connection.execute(text(
                        "SELECT count(*) FROM instance WHERE last_upload_error IS NOT NULL"
                    )).scalar_one())

            wait_until(attempted, 30, message="an upload attempt during the outage")
            waiting = spooled_copies(node.engine, node.spool.root)
            assert waiting == ((3, 0) if spooling == "index" else (0, 3))
            server.start()
            wait_uploaded(node.engine, 5, timeout=60)
            # The spooled copy goes right after the row records the object.
            wait_until(lambda: spooled_copies(node.engine, node.spool.root) == (0, 0), 10,
                       message="the uploaded spooled copies deleted")
        names = list(server.client().list_objects(bucket, recursive=True))
        assert len(names) == 5


def _uploads(tmp_path: Path, count: int) -> list[Upload]:
    return [Upload(f"study/series/sop{n}/x.dcm", *_payload(tmp_path, 1000 + n))
            for n in range(count)]


def test_a_batch_is_made_durable_by_one_syncfs_of_the_store(tmp_path: Path) -> None:
    synced: list[tuple[int, bool]] = []

    def syncfs(fd: int) -> None:
        synced.append((fd, Path(f"/proc/self/fd/{fd}").samefile(tmp_path / "objects")))

    store = FileObjectStore(tmp_path / "objects", syncfs=syncfs)
    uploads = _uploads(tmp_path, 5)
    assert store.put_files(uploads) == [None] * 5
    ((fd, of_the_store),) = synced
    assert of_the_store
    # Opened for the batch and closed after it: a write-back failure is reported to the
    # descriptors opened before it, so one shared by batches could hand it to another.
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)
    for upload in uploads:
        assert store.open(upload.key).read() == upload.path.read_bytes()


def test_a_failed_syncfs_fails_every_upload_of_its_batch(tmp_path: Path) -> None:
    def failing(_fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    store = FileObjectStore(tmp_path / "objects", syncfs=failing)
    outcomes = store.put_files(_uploads(tmp_path, 3))
    assert [type(outcome) for outcome in outcomes] == [ObjectStoreError] * 3
    assert all("Input/output error" in str(outcome) for outcome in outcomes)


def test_an_upload_that_cannot_be_placed_fails_alone(tmp_path: Path) -> None:
    store = FileObjectStore(tmp_path / "objects", syncfs=lambda _fd: None)
    good, blocked, wrong = _uploads(tmp_path, 3)
    (tmp_path / "objects" / "study").mkdir(parents=True)
    (tmp_path / "objects" / "study" / "series").mkdir()
    (tmp_path / "objects" / "study" / "series" / "sop1").write_text("not a directory")
    wrong = Upload(wrong.key, wrong.path, ExpectedContent(wrong.expected.size, 0, "0" * 64))
    outcomes = store.put_files([good, blocked, wrong])
    assert outcomes[0] is None
    assert isinstance(outcomes[1], ObjectStoreError)
    assert "cannot write study/series/sop1/x.dcm" in str(outcomes[1])
    assert isinstance(outcomes[2], ObjectVerificationError)


def test_without_syncfs_every_file_and_its_directory_are_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[tuple[Path, bool]] = []
    monkeypatch.setattr(filestore, "_libc_syncfs", lambda _root: None)
    monkeypatch.setattr(filestore, "_fsync_path",
                        lambda path, directory=False: synced.append((path, directory)))
    store = FileObjectStore(tmp_path / "objects")
    uploads = _uploads(tmp_path, 2)
    assert store.put_files(uploads) == [None, None]
    targets = [store._path(upload.key) for upload in uploads]
    assert sorted(synced) == sorted([(target, False) for target in targets]
                                    + [(target.parent, True) for target in targets])


@pytest.mark.parametrize("refusal", [errno.ENOSYS, errno.EPERM])
def test_a_syncfs_the_system_refuses_falls_back_to_fsyncs_for_good(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refusal: int
) -> None:
    calls: list[str] = []

    def refused(_fd: int) -> None:
        calls.append("syncfs")
        raise OSError(refusal, os.strerror(refusal))

    monkeypatch.setattr(filestore, "_fsync_path",
                        lambda path, directory=False: calls.append("fsync"))
    store = FileObjectStore(tmp_path / "objects", syncfs=refused)
    assert store.put_files(_uploads(tmp_path, 1)) == [None]
    assert store.put_files(_uploads(tmp_path, 1)) == [None]
    assert calls == ["syncfs", "fsync", "fsync", "fsync", "fsync"]


@pytest.mark.parametrize(("kernel", "file_system", "used"), [
    ((6, 1), "ext4", True),
    ((5, 8), "xfs", True),
    ((5, 7), "ext4", False),  # syncfs did not report write-back errors before 5.8
    ((6, 1), "nfs4", False),
    ((6, 1), "fuse.sshfs", False),
    ((6, 1), "tmpfs", False),
])
def test_syncfs_is_used_only_where_it_reports_failures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel: tuple[int, int],
    file_system: str, used: bool,
) -> None:
    monkeypatch.setattr(filestore, "_kernel_version", lambda: kernel)
    monkeypatch.setattr(filestore, "_file_system_type", lambda _path: file_system)
    assert (filestore._libc_syncfs(tmp_path) is not None) == used


def test_the_file_system_of_a_path_is_read_from_the_mount_table() -> None:
    assert filestore._file_system_type(Path("/proc/self")) == "proc"
    assert filestore._file_system_type(Path("/dev/shm/x")) == "tmpfs"


def test_object_key_layout_uses_uids_only() -> None:
    assert object_key("1.2.3", "1.2.3.4", "1.2.3.4.5", "ab" * 32) == (
        "1.2.3/1.2.3.4/1.2.3.4.5/" + "ab" * 32 + ".dcm"
    )
