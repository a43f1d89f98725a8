"""Object storage for instances: one small interface, a directory or an S3-compatible store.

Keys are laid out by UIDs only, never patient names:
``<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>/<sha256>.dcm``. Each distinct
content of an instance gets its own key, so a new version never overwrites an old one
and a repeated upload of the same content is idempotent.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from gateway.config import StorageConfig


class ObjectStoreError(Exception):
    """The object store could not complete the operation now (transient)."""


class ObjectVerificationError(ObjectStoreError):
    """What the store holds after an upload differs from what was sent."""


@dataclass(frozen=True, slots=True)
class ExpectedContent:
    """What a stored object must contain: its size and the SHA-256 of its dataset part."""

    size: int
    dataset_offset: int
    dataset_sha256: str


class ContentChecker:
    """Computes size and dataset SHA-256 of an object from its bytes, in order."""

    def __init__(self, expected: ExpectedContent) -> None:
        self.expected = expected
        self.size = 0
        self._digest = hashlib.sha256()

    def update(self, chunk: bytes | memoryview) -> None:
        start = max(0, self.expected.dataset_offset - self.size)
        if start < len(chunk):
            self._digest.update(chunk[start:])
        self.size += len(chunk)

    def verify(self, key: str) -> None:
        """Raise :class:`ObjectVerificationError` unless the bytes seen are the expected ones."""
        if self.size != self.expected.size:
            raise ObjectVerificationError(
                f"{key}: stored size {self.size} differs from the expected {self.expected.size}"
            )
        if self._digest.hexdigest() != self.expected.dataset_sha256:
            raise ObjectVerificationError(f"{key}: stored dataset checksum differs from the index")


@dataclass(frozen=True, slots=True)
class Upload:
    """One object to store: the file at *path* under *key*, expected to be *expected*."""

    key: str
    path: Path
    expected: ExpectedContent


class ObjectStore(Protocol):
    """Where instances live after they leave the spool."""

    description: str

    def put_file(self, key: str, path: Path, expected: ExpectedContent) -> None:
        """Store the file at *path* under *key*; verify the stored size and checksum."""

    def put_files(self, uploads: Sequence[Upload]) -> list[ObjectStoreError | None]:
        """Store several files, as :meth:`put_file` does each; per upload, in order, its
        error or None once stored and verified. After an error that is not about the
        object's own bytes (:class:`ObjectVerificationError`) the store may stop trying:
        the uploads not tried get that error too."""

    def open(self, key: str) -> BinaryIO:
        """A stream of the object's bytes."""

    def size(self, key: str) -> int | None:
        """The stored size, or ``None`` when there is no such object."""

    def local_path(self, key: str) -> Path | None:
        """A path to read the object from directly, when the store is local."""

    def check(self) -> None:
        """Raise :class:`ObjectStoreError` when the store is not reachable and writable."""


def object_key(study_uid: str, series_uid: str, sop_uid: str, sha256: str) -> str:
    """The key of one instance version (UIDs are validated before they get here)."""
    return f"{study_uid}/{series_uid}/{sop_uid}/{sha256}.dcm"


def open_object_store(config: StorageConfig) -> ObjectStore:
    """The object store the configuration names."""
    url = config.object_store
    if url.startswith("file://"):
        from gateway.objectstore.filestore import FileObjectStore

        return FileObjectStore(Path(url[len("file://") :]))
    from gateway.objectstore.s3store import S3ObjectStore

    bucket, _, prefix = url[len("s3://") :].partition("/")
    return S3ObjectStore(
        endpoint=config.s3.endpoint,
        bucket=bucket,
        prefix=prefix,
        access_key=os.environ.get("DICOM_GATEWAY_S3_ACCESS_KEY", ""),
        secret_key=os.environ.get("DICOM_GATEWAY_S3_SECRET_KEY", ""),
        secure=config.s3.secure,
        region=config.s3.region,
        create_bucket=config.s3.create_bucket,
    )
