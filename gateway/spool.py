"""The local durable spool: where a received instance becomes durable before it is acked.

Layout under ``spool_dir``:

- ``incoming/``: files being received. Nothing here was acknowledged; it is emptied at
  start-up and stale files are swept while running.
- ``ready/``: fsync'ed instances (file and directory entry) named ``<uuid>.dcm``,
  referenced by an index row until the object store has them. A file is renamed here
  just before it is flushed: one that no row references may be incomplete (a crash
  before its acknowledgement).
- ``orphaned/``: files found in ``ready/`` at start-up that no index row references (a
  commit that never happened, or a database restored from an older backup). They are
  kept, not deleted, for ``orphan_retention`` and then removed. One whose instance was
  never acknowledged may be incomplete: verify (parse) a file before using it.
- ``node-id``: this spool's identity in a shared database; ``lock``: held while a node
  runs on this spool, so two processes can never share it.

Instances small enough (``storage.spool_in_index_max_bytes``) are not here at all: they
are spooled in the index, in the transaction of their index row (:mod:`gateway.ingest`).
:func:`content_path` lets them be read like a spool file.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from gateway.logs import get_logger

log = get_logger(__name__)


class SpoolError(OSError):
    """The spool cannot take the instance (disk full, I/O error, ...)."""


class SpoolInUseError(Exception):
    """Another process runs a node on this spool."""


_SYNC_FILE_RANGE_WRITE = 2


def kernel_version() -> tuple[int, int]:
    """The running kernel's (major, minor) version; (0, 0) when it cannot be read."""
    try:
        major, minor = os.uname().release.split(".")[:2]
        return int(major), int("".join(c for c in minor if c.isdigit()) or 0)
    except (ValueError, AttributeError):
        return (0, 0)


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    # The file is flushed through a descriptor opened after the early write-back: Linux
    # before 4.18 (4.13-4.17 without a later fix) may not report to it a write-back
    # error that happened before its open. There, no early write-back.
    if kernel_version() < (4, 18):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux (or not glibc/musl)
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_start_writeback = _sync_file_range()


def start_writeback(fd: int) -> None:
    """Ask the kernel to start writing *fd*'s dirty pages to disk now, while the rest of
    the instance is still arriving, so that the ``fdatasync`` in :meth:`Spool.persist`
    waits for less (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``, as PostgreSQL's
    ``pg_flush_data`` does). Only a hint: it makes nothing durable, pages already being
    written are skipped, and where it is missing (not Linux, or before 4.18) or fails
    nothing changes."""
    if _start_writeback is not None:
        _start_writeback(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def content_path(content: bytes) -> Iterator[Path]:
    """A path to read *content* from as from a file (an anonymous file in memory), for
    the code that sends or uploads files; valid while the block runs."""
    fd = os.memfd_create("spooled-content", os.MFD_CLOEXEC)
    try:
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view):]
        yield Path(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


class SharedFsync:
    """``fsync`` of one directory, shared by every caller waiting at the same time.

    A rename into ``ready/`` is durable once an ``fsync`` of the directory *started*
    after it. Associations storing at the same moment each need one; a caller that
    finds an ``fsync`` already running waits for it to end and then for one that
    covers it, which starts at once and covers every caller that queued meanwhile
    (at most two flushes of waiting, however many associations). A failed ``fsync``
    is every covered caller's error: none of them may answer Success.
    """

    def __init__(self, fd: int, fsync: Callable[[int], None] = os.fsync) -> None:
        self._fd = fd
        self._fsync = fsync
        self._cond = threading.Condition()
        self._requested = 0  # callers so far; caller n needs an fsync started after it
        self._synced = 0  # every caller up to this one is covered by a finished fsync
        self._failed = 0  # every caller up to this one is covered by a failed fsync
        self._error: OSError | None = None
        self._running = False

    def sync(self) -> None:
        """Return once an ``fsync`` that started after this call has succeeded."""
        with self._cond:
            self._requested += 1
            ticket = self._requested
            while True:
                # A failure is checked first: a caller may wake only after a later
                # fsync succeeded, and its own (failed) one must still count. After a
                # failure a caller may also see a later one's error: on a failing disk
                # a failure too many is the safe side.
                if ticket <= self._failed:
                    assert self._error is not None
                    raise OSError(self._error.errno, self._error.strerror)
                if self._synced >= ticket:
                    return
                if self._running:
                    self._cond.wait()
                    continue
                self._running = True
                covers = self._requested
                self._cond.release()
                error: OSError | None = None
                try:
                    self._fsync(self._fd)
                except OSError as exc:
                    error = exc
                finally:
                    self._cond.acquire()
                    self._running = False
                    self._cond.notify_all()
                if error is not None:
                    self._failed, self._error = covers, error
                else:
                    self._synced = covers


class Spool:
    """Durable local staging of received instances."""

    def __init__(self, root: Path, min_free_bytes: int = 0) -> None:
        self.root = root.resolve()
        self.incoming = self.root / "incoming"
        self.ready = self.root / "ready"
        self.orphaned = self.root / "orphaned"
        self.min_free_bytes = min_free_bytes
        for directory in (self.incoming, self.ready, self.orphaned):
            directory.mkdir(parents=True, exist_ok=True)
        self._ready_fd = os.open(self.ready, os.O_RDONLY | os.O_DIRECTORY)
        self._ready_sync = SharedFsync(self._ready_fd)
        self._lock_fd: int | None = None
        self._free_checked_at = 0.0
        self._free_ok = True

    def lock(self) -> None:
        """Claim the spool for this process; raise :class:`SpoolInUseError` if taken."""
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            message = f"{self.root} is in use by another dicom-gateway process"
            raise SpoolInUseError(message) from None
        self._lock_fd = fd

    @property
    def lock_fd(self) -> int | None:
        """The descriptor holding the spool lock (passed on to the node's worker process)."""
        return self._lock_fd

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._ready_fd)
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = None

    def identity(self) -> str:
        """This spool's stable identity, created (durably) on first start.

        Index rows in a shared database record which spool holds them, so each node
        uploads only its own files. It lives with the spool, not the host name, so it
        survives container re-creation and host renames.
        """
        path = self.root / "node-id"
        if path.exists():
            identity = path.read_text(encoding="ascii").strip()
            if not identity:
                raise SpoolError(0, f"{path} is empty; restore it (see its backup) or remove it")
            return identity
        identity = f"node-{uuid.uuid4().hex[:12]}"
        staged = self.root / f"node-id.{uuid.uuid4().hex}"
        with staged.open("w", encoding="ascii") as stream:
            stream.write(identity + "\n")
            stream.flush()
            os.fsync(stream.fileno())
        staged.rename(path)
        _fsync_directory(self.root)
        return identity

    def path(self, name: str) -> Path:
        """Path of a ready spool file."""
        return self.ready / name

    def has_room(self) -> bool:
        """Whether the spool file system has the configured free space (checked ≤ 1/s)."""
        now = time.monotonic()
        if now - self._free_checked_at >= 1.0:
            try:
                free = shutil.disk_usage(self.root).free
            except OSError:
                free = 0
            self._free_ok = free >= self.min_free_bytes
            self._free_checked_at = now
        return self._free_ok

    def persist(self, received: Path) -> str:
        """Make a fully received file durable in ``ready/`` and return its spool name.

        After this returns, the bytes and the directory entry are on stable storage.
        """
        name = f"{uuid.uuid4().hex}.dcm"
        try:
            # Renamed first, flushed after: the file's flush then commits the rename
            # with the file system's journal, and the directory's finds nothing left to
            # do (one journal commit instead of two on ext4 and XFS). Before both
            # flushes have returned nothing refers to the file: a crash in between
            # leaves an unreferenced file in ready/, quarantined at start-up as an
            # orphan, as a crash before the index commit always has.
            received.rename(self.ready / name)
            fd = os.open(self.ready / name, os.O_RDONLY)
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
            self._ready_sync.sync()
        except OSError as exc:
            self.discard_received(received)
            with contextlib.suppress(OSError):
                (self.ready / name).unlink()
            raise SpoolError(exc.errno, f"spool write failed: {exc.strerror}") from exc
        return name

    def discard(self, name: str) -> None:
        """Remove a ready spool file (uploaded, duplicate, or never acknowledged)."""
        with contextlib.suppress(FileNotFoundError):
            (self.ready / name).unlink()

    def discard_received(self, received: Path) -> None:
        """Remove a file in ``incoming/`` that will not be kept."""
        with contextlib.suppress(FileNotFoundError):
            received.unlink()

    def clear_incoming(self, older_than: float | None = None) -> int:
        """Delete partial receptions; with *older_than*, only files idle that many seconds."""
        removed = 0
        cutoff = time.time() - older_than if older_than is not None else None
        for entry in os.scandir(self.incoming):
            try:
                if cutoff is not None and entry.stat().st_mtime > cutoff:
                    continue
                Path(entry.path).unlink()
                removed += 1
            except FileNotFoundError:
                continue
        return removed

    def clear_outgoing(self) -> None:
        """Remove copies downloaded for forwarding by a previous run."""
        outgoing = self.root / "outgoing"
        if outgoing.is_dir():
            shutil.rmtree(outgoing, ignore_errors=True)

    def ready_names(self) -> set[str]:
        """Names of all files in ``ready/``."""
        return {entry.name for entry in os.scandir(self.ready) if entry.name.endswith(".dcm")}

    def quarantine(self, name: str) -> None:
        """Move an unreferenced ready file aside instead of deleting it."""
        with contextlib.suppress(FileNotFoundError):
            (self.ready / name).rename(self.orphaned / name)

    def sweep_orphaned(self, older_than: float) -> int:
        """Delete quarantined files older than *older_than* seconds."""
        removed = 0
        cutoff = time.time() - older_than
        for entry in os.scandir(self.orphaned):
            with contextlib.suppress(FileNotFoundError):
                if entry.stat().st_mtime < cutoff:
                    Path(entry.path).unlink()
                    removed += 1
        return removed
