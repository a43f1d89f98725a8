"""The local durable spool: where a received instance becomes durable before it is acked.

Layout under ``spool_dir``:

- ``incoming/``: files being received. Nothing here was acknowledged; it is emptied at
  start-up and stale files are swept while running.
- ``ready/``: fsync'ed instances (file and directory entry) named ``<uuid>.dcm``,
  referenced by an index row until the object store has them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from pathlib import Path

from gateway.logs import get_logger

log = get_logger(__name__)


class SpoolError(OSError):
    """The spool cannot take the instance (disk full, I/O error, ...)."""


class Spool:
    """Durable local staging of received instances."""

    def __init__(self, root: Path, min_free_bytes: int = 0) -> None:
        self.root = root.resolve()
        self.incoming = self.root / "incoming"
        self.ready = self.root / "ready"
        self.min_free_bytes = min_free_bytes
        self.incoming.mkdir(parents=True, exist_ok=True)
        self.ready.mkdir(parents=True, exist_ok=True)
        self._ready_fd = os.open(self.ready, os.O_RDONLY | os.O_DIRECTORY)
        self._free_checked_at = 0.0
        self._free_ok = True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._ready_fd)

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
            fd = os.open(received, os.O_RDONLY)
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
            received.rename(self.ready / name)
            os.fsync(self._ready_fd)
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

    def ready_names(self) -> set[str]:
        """Names of all files in ``ready/``."""
        return {entry.name for entry in os.scandir(self.ready) if entry.name.endswith(".dcm")}
