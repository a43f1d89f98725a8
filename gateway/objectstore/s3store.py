"""An S3-compatible object store through the ``minio`` client."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO, cast

import urllib3
from minio import Minio
from minio.error import MinioException, S3Error
from minio.helpers import get_part_info

from gateway.objectstore import (
    ContentChecker,
    ExpectedContent,
    ObjectStoreError,
    ObjectVerificationError,
    Upload,
)

_MD5_ETAG = re.compile(r"^[0-9a-f]{32}(-\d+)?$")
_CHUNK = 1024 * 1024
# Failures that mean "the store is not reachable or not working now".
_TRANSIENT = (MinioException, urllib3.exceptions.HTTPError, OSError)


class _PartHashingReader:
    """Feeds what minio reads to a content checker and per-part MD5s (for the ETag)."""

    def __init__(self, stream: BinaryIO, checker: ContentChecker, part_size: int) -> None:
        self._stream = stream
        self._checker = checker
        self._part_size = part_size
        self._in_part = 0
        self._current = hashlib.md5()  # noqa: S324 - S3 ETags are MD5; not used for security
        self.part_digests: list[bytes] = []

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self._checker.update(data)
        view = memoryview(data)
        while view:
            take = min(len(view), self._part_size - self._in_part)
            self._current.update(view[:take])
            self._in_part += take
            view = view[take:]
            if self._in_part == self._part_size:
                self._finish_part()
        return data

    def _finish_part(self) -> None:
        self.part_digests.append(self._current.digest())
        self._current = hashlib.md5()  # noqa: S324
        self._in_part = 0

    def expected_etag(self) -> str:
        if self._in_part:
            self._finish_part()
        if len(self.part_digests) == 1:
            return self.part_digests[0].hex()
        combined = hashlib.md5(b"".join(self.part_digests)).hexdigest()  # noqa: S324
        return f"{combined}-{len(self.part_digests)}"


class S3ObjectStore:
    """Objects in one bucket (optionally under a prefix) of an S3-compatible store."""

    def __init__(
        self,
        *,
        endpoint: str,
        bucket: str,
        prefix: str,
        access_key: str,
        secret_key: str,
        secure: bool,
        region: str | None,
        create_bucket: bool,
    ) -> None:
        self.bucket = bucket
        self.prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        scheme = "https" if secure else "http"
        self.description = f"s3://{bucket}/{self.prefix} at {scheme}://{endpoint}"
        self._create_bucket = create_bucket
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=5.0, read=120.0),
            retries=urllib3.Retry(total=2, backoff_factor=0.2, status_forcelist=(500, 502, 503)),
            maxsize=16,
        )
        self._client = Minio(
            endpoint,
            access_key=access_key or None,
            secret_key=secret_key or None,
            secure=secure,
            region=region,
            http_client=http,
        )

    def _key(self, key: str) -> str:
        return self.prefix + key

    def check(self) -> None:
        try:
            if self._client.bucket_exists(self.bucket):
                return
            if self._create_bucket:
                self._client.make_bucket(self.bucket)
                return
        except _TRANSIENT as exc:
            raise ObjectStoreError(f"{self.description} is not reachable: {exc}") from exc
        raise ObjectStoreError(f"bucket {self.bucket!r} does not exist")

    def put_file(self, key: str, path: Path, expected: ExpectedContent) -> None:
        name = self._key(key)
        size = path.stat().st_size
        part_size, _ = get_part_info(size, 0)
        checker = ContentChecker(expected)
        try:
            with path.open("rb") as stream:
                reader = _PartHashingReader(stream, checker, part_size)
                self._client.put_object(
                    self.bucket,
                    name,
                    cast(Any, reader),
                    size,
                    content_type="application/dicom",
                    metadata={"x-amz-meta-dataset-sha256": expected.dataset_sha256},
                    part_size=part_size,
                    num_parallel_uploads=1,
                )
            checker.verify(key)
            stat = self._client.stat_object(self.bucket, name)
        except _TRANSIENT as exc:
            raise ObjectStoreError(f"upload of {key} failed: {exc}") from exc
        if stat.size != size:
            raise ObjectVerificationError(f"{key}: stored size {stat.size} differs from {size}")
        etag = (stat.etag or "").strip('"')
        if not (_MD5_ETAG.match(etag) and etag == reader.expected_etag()):
            # Not an MD5 ETag (server-side encryption, other part sizes): read it back.
            self._read_back_and_verify(key, expected)

    def put_files(self, uploads: Sequence[Upload]) -> list[ObjectStoreError | None]:
        """One after the other; after a failure of the store itself the rest are not
        tried (they get its error)."""
        outcomes: list[ObjectStoreError | None] = []
        for upload in uploads:
            try:
                self.put_file(upload.key, upload.path, upload.expected)
            except ObjectVerificationError as exc:
                outcomes.append(exc)
            except ObjectStoreError as exc:
                outcomes.extend([exc] * (len(uploads) - len(outcomes)))
                break
            else:
                outcomes.append(None)
        return outcomes

    def _read_back_and_verify(self, key: str, expected: ExpectedContent) -> None:
        """For stores whose ETag is not an MD5 (e.g. server-side encryption)."""
        checker = ContentChecker(expected)
        stream = self.open(key)
        try:
            while chunk := stream.read(_CHUNK):
                checker.update(chunk)
        finally:
            stream.close()
        checker.verify(key)

    def open(self, key: str) -> BinaryIO:
        try:
            response = self._client.get_object(self.bucket, self._key(key))
        except S3Error as exc:
            if exc.code == "NoSuchKey":
                raise FileNotFoundError(key) from exc
            raise ObjectStoreError(f"cannot read {key}: {exc}") from exc
        except _TRANSIENT as exc:
            raise ObjectStoreError(f"cannot read {key}: {exc}") from exc
        return cast(BinaryIO, response)

    def local_path(self, key: str) -> Path | None:
        return None

    def size(self, key: str) -> int | None:
        try:
            stat = self._client.stat_object(self.bucket, self._key(key))
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject"):
                return None
            raise ObjectStoreError(f"cannot stat {key}: {exc}") from exc
        except _TRANSIENT as exc:
            raise ObjectStoreError(f"cannot stat {key}: {exc}") from exc
        return int(stat.size) if stat.size is not None else None
