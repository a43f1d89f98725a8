"""A directory as the object store (the embedded default)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

from gateway.objectstore import ContentChecker, ExpectedContent, ObjectStoreError, Upload
from gateway.spool import kernel_version

_CHUNK = 1024 * 1024
_NO_LINK = (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP)


def _fsync_path(path: Path, *, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# File systems whose syncfs writes back every file's data and metadata and reports a
# write-back error (with Linux 5.8 and later); on others (network, FUSE, ...) each file
# and directory is fsynced.
_SYNCFS_FILE_SYSTEMS = frozenset({"ext4", "ext3", "xfs", "btrfs", "f2fs"})


def _libc_syncfs(root: Path) -> Callable[[int], None] | None:
    """``syncfs(2)`` for the file system of *root*, where it is known to make everything
    written durable and to report a failed write-back; None elsewhere."""
    if _kernel_version() < (5, 8) or _file_system_type(root) not in _SYNCFS_FILE_SYSTEMS:
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None

    def syncfs(fd: int) -> None:
        if function(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))

    return syncfs


# Linux before 5.8 returns 0 from syncfs even when a write-back failed.
_kernel_version = kernel_version


def _file_system_type(path: Path) -> str:
    """The type of the mounted file system holding *path* (``/proc/self/mountinfo``)."""
    best, kind = "", ""
    target = str(path)
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, after = left.split(), right.split()
        if len(fields) < 5 or not after:
            continue
        mount = fields[4].replace("\\040", " ")
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, kind = mount, after[0]
    return kind


class FileObjectStore:
    """Objects are files under a root directory, written durably.

    Objects are placed (written to a staging name, renamed to their key) and then made
    durable together: one ``syncfs`` of the store's file system covers every file and
    directory entry of a batch, where an ``fsync`` of each file and of each directory
    would cost a disk flush apiece (on file systems and kernels where syncfs is not
    known to do that, each is fsynced). When the source is on the same file system,
    placing is a hard link: atomic and zero-copy. Either way the stored object is read
    back and checked against the index.
    """

    def __init__(self, root: Path, *, syncfs: Callable[[int], None] | None = None) -> None:
        self.root = root.resolve()
        self._root_prefix = str(self.root).rstrip("/") + "/"
        self.description = f"file://{self.root}"
        self._tmp = self.root / ".tmp"
        self._syncfs = syncfs
        self._syncfs_chosen = syncfs is not None

    def _path(self, key: str) -> Path:
        # Lexical: keys are made by the gateway and nothing links out of the store, so
        # ".." and absolute keys are what to refuse (resolve() cost an lstat per
        # component of the root on every upload and forward).
        path = os.path.normpath(self._root_prefix + key)
        if key.startswith("/") or not path.startswith(self._root_prefix):
            raise ValueError(f"object key {key!r} leaves the store")
        return Path(path)

    def check(self) -> None:
        try:
            self._tmp.mkdir(parents=True, exist_ok=True)
            probe = self._tmp / f"probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            raise ObjectStoreError(f"{self.description} is not writable: {exc.strerror}") from exc

    def put_file(self, key: str, path: Path, expected: ExpectedContent) -> None:
        error = self.put_files([Upload(key, path, expected)])[0]
        if error is not None:
            raise error

    def put_files(self, uploads: Sequence[Upload]) -> list[ObjectStoreError | None]:
        """Store each upload's file under its key, all made durable by one flush, then
        verify each; an upload's error, or None once it is stored and verified."""
        # Opened before anything is written: syncfs reports a failed write-back to the
        # descriptors opened before the failure, so this batch's failures reach it.
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            failure = ObjectStoreError(f"{self.description} is not usable: {exc.strerror}")
            return [failure] * len(uploads)
        try:
            return self._put_all(uploads, root_fd)
        finally:
            os.close(root_fd)

    def _put_all(self, uploads: Sequence[Upload], root_fd: int) -> list[ObjectStoreError | None]:
        outcomes: list[ObjectStoreError | None] = []
        placed: list[int] = []
        for index, upload in enumerate(uploads):
            try:
                self._place(upload.key, upload.path)
            except ObjectStoreError as exc:
                outcomes.append(exc)
                continue
            outcomes.append(None)
            placed.append(index)
        if placed:
            try:
                self._make_durable([self._path(uploads[i].key) for i in placed], root_fd)
            except OSError as exc:
                failure = ObjectStoreError(f"cannot make objects durable: {exc.strerror or exc}")
                for index in placed:
                    outcomes[index] = failure
                return outcomes
        for index in placed:
            try:
                self._verify(uploads[index].key, uploads[index].expected)
            except ObjectStoreError as exc:
                outcomes[index] = exc
        return outcomes

    def _place(self, key: str, source: Path) -> None:
        """Put a copy of *source* at *key*'s path, atomically (not yet durable)."""
        target = self._path(key)
        staged = self._tmp / uuid.uuid4().hex
        try:
            self._tmp.mkdir(parents=True, exist_ok=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            self._stage(source, staged)
            staged.replace(target)
        except OSError as exc:
            with contextlib.suppress(OSError):
                staged.unlink()
            raise ObjectStoreError(f"cannot write {key}: {exc.strerror or exc}") from exc

    def _make_durable(self, targets: list[Path], root_fd: int) -> None:
        """The placed files' bytes and names on stable storage."""
        if not self._syncfs_chosen:
            self._syncfs, self._syncfs_chosen = _libc_syncfs(self.root), True
        if self._syncfs is not None:
            try:
                self._syncfs(root_fd)
            except OSError as exc:
                if exc.errno not in (errno.ENOSYS, errno.EPERM, errno.EOPNOTSUPP):
                    raise
                self._syncfs = None  # not allowed here (a seccomp filter): fsync instead
            else:
                return
        directories = {target.parent for target in targets}
        for target in targets:
            _fsync_path(target)
        for directory in directories:
            _fsync_path(directory, directory=True)

    def _verify(self, key: str, expected: ExpectedContent) -> None:
        checker = ContentChecker(expected)
        with self._path(key).open("rb") as stored:
            while chunk := stored.read(_CHUNK):
                checker.update(chunk)
        checker.verify(key)

    @staticmethod
    def _stage(source: Path, staged: Path) -> None:
        """Place a copy of *source* at *staged* (durable once the batch is synced)."""
        try:
            os.link(source, staged)
        except OSError as exc:
            if exc.errno not in _NO_LINK:
                raise
            with source.open("rb") as reader, staged.open("wb") as writer:
                while chunk := reader.read(_CHUNK):
                    writer.write(chunk)

    def open(self, key: str) -> BinaryIO:
        try:
            return self._path(key).open("rb")
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise ObjectStoreError(f"cannot read {key}: {exc.strerror}") from exc

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def size(self, key: str) -> int | None:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ObjectStoreError(f"cannot stat {key}: {exc.strerror}") from exc
