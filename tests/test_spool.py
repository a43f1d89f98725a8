"""The spool's durable write: a received file becomes a ready one, flushed after its
rename (one journal commit), or nothing is left of it."""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway import spool as spool_module
from gateway.spool import Spool, SpoolError, start_writeback


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    opened = Spool(tmp_path / "spool")
    yield opened
    opened.close()


def _received(spool: Spool, content: bytes = b"DICM" * 1000) -> Path:
    path = spool.incoming / "lane-1-1.dcm"
    path.write_bytes(content)
    return path


def test_a_persisted_file_is_in_ready_with_its_content_and_gone_from_incoming(
    spool: Spool,
) -> None:
    received = _received(spool)
    name = spool.persist(received)
    assert name.endswith(".dcm")
    assert (spool.ready / name).read_bytes() == b"DICM" * 1000
    assert not any(spool.incoming.iterdir())


def test_the_file_is_flushed_under_its_ready_name_and_the_directory_after_it(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, str]] = []
    fdatasync, fsync = os.fdatasync, os.fsync

    def recording_fdatasync(fd: int) -> None:
        calls.append(("file", str(Path(f"/proc/self/fd/{fd}").readlink())))
        fdatasync(fd)

    def recording_fsync(fd: int) -> None:
        calls.append(("directory", str(Path(f"/proc/self/fd/{fd}").readlink())))
        fsync(fd)

    monkeypatch.setattr(spool_module.os, "fdatasync", recording_fdatasync)
    monkeypatch.setattr(spool._ready_sync, "_fsync", recording_fsync)
    name = spool.persist(_received(spool))
    assert calls == [("file", str(spool.ready / name)), ("directory", str(spool.ready))]


@pytest.mark.parametrize("failing", ["fdatasync", "directory fsync"])
def test_a_failed_flush_leaves_nothing_behind(
    spool: Spool, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    def eio(_fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    if failing == "fdatasync":
        monkeypatch.setattr(spool_module.os, "fdatasync", eio)
    else:
        monkeypatch.setattr(spool._ready_sync, "_fsync", eio)
    with pytest.raises(SpoolError, match="spool write failed"):
        spool.persist(_received(spool))
    assert not any(spool.incoming.iterdir())
    assert not any(spool.ready.iterdir())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_writeback_is_requested_from_the_kernel_on_linux(tmp_path: Path) -> None:
    assert spool_module._start_writeback is not None
    path = tmp_path / "file"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"x" * 300_000)
        start_writeback(fd)
    finally:
        os.close(fd)
    assert path.stat().st_size == 300_000


def test_a_writeback_request_that_fails_changes_nothing(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    os.close(fd)
    start_writeback(fd)  # a closed descriptor: EBADF, ignored (it is only a hint)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
@pytest.mark.parametrize(("kernel", "hinted"), [((4, 17), False), ((4, 18), True),
                                                 ((6, 1), True), ((0, 0), False)])
def test_early_writeback_only_where_a_later_flush_reports_its_errors(
    monkeypatch: pytest.MonkeyPatch, kernel: tuple[int, int], hinted: bool
) -> None:
    # Before 4.18 a write-back error from before the flush's own open could go unseen.
    monkeypatch.setattr(spool_module, "kernel_version", lambda: kernel)
    assert (spool_module._sync_file_range() is not None) is hinted
