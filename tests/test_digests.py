"""The received file's digests: SHA-256 of the data set, SHA-1 of the whole file."""

from __future__ import annotations

import hashlib
import io
from typing import Any

import pytest

from gateway import ingest


@pytest.mark.parametrize("chunk", [16, 1024 * 1024])
@pytest.mark.parametrize(("size", "offset"), [
    (1, 0), (200, 132), (200, 200), (15, 3), (16, 0), (17, 16), (33, 5), (100, 99),
])
@pytest.mark.parametrize("with_sha1", [False, True])
def test_digests_cover_the_data_set_and_the_whole_file_whatever_the_chunk_size(
    monkeypatch: pytest.MonkeyPatch, chunk: int, size: int, offset: int, with_sha1: bool
) -> None:
    monkeypatch.setattr(ingest, "_HASH_CHUNK", chunk)
    data = bytes(range(256)) * (size // 256 + 1)
    data = data[:size]
    stream: Any = io.BufferedReader(io.BytesIO(data))  # type: ignore[arg-type]
    digest, sha1 = ingest._digests(stream, offset, size, with_sha1=with_sha1)
    assert digest == hashlib.sha256(data[offset:]).hexdigest()
    assert sha1 == (hashlib.sha1(data).hexdigest() if with_sha1 else None)
