"""A directory as the object store (the embedded default)."""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from pathlib import Path
from typing import BinaryIO

from gateway.objectstore import ContentChecker, ExpectedContent, ObjectStoreError

_CHUNK = 1024 * 1024
_NO_LINK = (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP)


def _fsync_path(path: Path, *, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileObjectStore:
    """Objects are files under a root directory, written durably (fsync, rename, fsync).

    When the spool is on the same file system, an upload is a hard link: atomic and
    zero-copy. Either way the stored object is read back and checked against the index.
    """

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self._root_prefix = str(self.root).rstrip("/") + "/"
        self.description = f"file://{self.root}"
        self._tmp = self.root / ".tmp"

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
        target = self._path(key)
        staged = self._tmp / uuid.uuid4().hex
        try:
            self._tmp.mkdir(parents=True, exist_ok=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            self._stage(path, staged)
            staged.replace(target)
            _fsync_path(target.parent, directory=True)
        except OSError as exc:
            with contextlib.suppress(OSError):
                staged.unlink()
            raise ObjectStoreError(f"cannot write {key}: {exc.strerror or exc}") from exc
        checker = ContentChecker(expected)
        with target.open("rb") as stored:
            while chunk := stored.read(_CHUNK):
                checker.update(chunk)
        checker.verify(key)

    @staticmethod
    def _stage(source: Path, staged: Path) -> None:
        """Place a durable copy of *source* at *staged*."""
        try:
            os.link(source, staged)
        except OSError as exc:
            if exc.errno not in _NO_LINK:
                raise
            with source.open("rb") as reader, staged.open("wb") as writer:
                while chunk := reader.read(_CHUNK):
                    writer.write(chunk)
                writer.flush()
                os.fsync(writer.fileno())
        # The staged name itself need not survive a crash: the rename into place and the
        # fsync of the target's directory are what make the object durable.

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
