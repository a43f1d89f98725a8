"""Bulk import: send files and folders through the running node's normal pipeline.

Each file is sent by C-STORE to the node itself (calling AE title = the node's own AE
title, which the node accepts from this host), so an imported instance is spooled,
indexed, stored, routed and raises events exactly like one from a modality. Files the
index already holds with the same content are skipped, so an interrupted import can
simply be run again.

"Already stored" means the index holds a current instance with the same SOP Instance
UID. The same instance sent earlier by a modality is usually encoded a little
differently from an exported file, so content is not compared unless asked
(``--changed``): then a file whose content differs is sent and becomes a new version.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from pynetdicom import AE, _config
from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError

from gateway import dimse_reactor
from gateway.acceptance import describe_rejection
from gateway.dicom.header import HeaderError, read_file_meta
from gateway.index.database import describe_error
from gateway.index.repository import instance_table
from gateway.index.schema import current_instance
from gateway.status import StatusCategory, classify, describe
from gateway.transfer import MAX_CONTEXTS, ProposedContext, contexts_for

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
_HASH_CHUNK = 1024 * 1024
_BATCH = 200
# Room for the contexts of a batch within MAX_CONTEXTS (a pair may need two).
_PAIRS_PER_ASSOCIATION = MAX_CONTEXTS // 2


class NodeUnreachableError(Exception):
    """The node did not accept an association; nothing more can be imported now."""


@dataclass(frozen=True, slots=True)
class Candidate:
    """A readable Part 10 file and what identifies its content."""

    path: Path
    size: int
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    sha256: str


@dataclass
class ImportSummary:
    imported: int = 0
    duplicates: int = 0
    changed: int = 0
    """Of the duplicates: the stored instance's content differs from the file's."""
    bytes_sent: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)
    """Unreadable files and files the node refused, with the reason."""
    warnings: list[tuple[Path, str]] = field(default_factory=list)
    """Imported, with a warning status from the node (e.g. coerced attributes)."""


def walk(paths: Iterable[Path]) -> Iterator[Path]:
    """Every regular file under *paths*, folders in name order."""
    for path in paths:
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    yield Path(root) / name
        else:
            yield path


def scan(path: Path) -> Candidate | str:
    """Read a file's meta header and content digest, or say why it cannot be imported.

    The digest covers the data set after the file meta group, as the node computes it
    for what it receives, so an unchanged file is recognised as already stored.
    """
    try:
        with path.open("rb") as stream:
            size = os.fstat(stream.fileno()).st_size
            if size < 132:
                return "not a DICOM Part 10 file (too short)"
            with mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                meta, offset = read_file_meta(mapped)
            identity = _identity(meta, offset, size)
            if isinstance(identity, str):
                return identity
            digest = hashlib.sha256()
            stream.seek(offset)
            while chunk := stream.read(_HASH_CHUNK):
                digest.update(chunk)
    except HeaderError as exc:
        return str(exc)
    except (OSError, ValueError) as exc:
        return f"cannot read: {getattr(exc, 'strerror', None) or exc}"
    return Candidate(path, size, *identity, digest.hexdigest())


def _identity(meta: Any, offset: int, size: int) -> tuple[str, str, str] | str:
    """(SOP class, SOP instance, transfer syntax) from the file meta, or why not."""
    sop_class, sop_instance, syntax = (
        str(meta.get(keyword, "")).strip() for keyword in
        ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")
    )
    if not (sop_class and sop_instance and syntax):
        return "file meta lacks the SOP class, SOP instance or transfer syntax UID"
    if sop_class == MEDIA_STORAGE_DIRECTORY:
        return "a DICOMDIR (media directory), not an instance"
    if offset >= size:
        return "no data set after the file meta information"
    return sop_class, sop_instance, syntax


def stored_digests(engine: Engine, sop_instance_uids: list[str]) -> dict[str, str]:
    """SOP Instance UID -> SHA-256 of the current versions the index holds."""
    i = instance_table.c
    with engine.connect() as connection:
        rows = connection.execute(
            select(i.sop_instance_uid, i.sha256).where(
                i.sop_instance_uid.in_(sop_instance_uids), current_instance()
            )
        )
        return {row.sop_instance_uid: row.sha256 for row in rows}


class Progress:
    """A progress bar on a terminal; a line every few seconds otherwise."""

    def __init__(self, total: int, stream: TextIO = sys.stderr) -> None:
        self.total = total
        self.stream = stream
        self.done = 0
        self.bytes = 0
        self.started = time.monotonic()
        self._shown_at = 0.0
        self._tty = stream.isatty()

    def advance(self, size: int = 0) -> None:
        self.done += 1
        self.bytes += size
        now = time.monotonic()
        if now - self._shown_at >= (0.2 if self._tty else 5.0) or self.done == self.total:
            self._shown_at = now
            self._show(now)

    def _show(self, now: float) -> None:
        elapsed = max(now - self.started, 1e-6)
        fraction = self.done / self.total if self.total else 1.0
        rate = self.bytes / elapsed / 1e6
        eta = (elapsed / fraction - elapsed) if fraction else 0.0
        if self._tty:
            bar = "#" * int(fraction * 30)
            self.stream.write(f"\r[{bar:<30}] {self.done}/{self.total} files "
                              f"{fraction:4.0%}  {rate:6.1f} MB/s  ETA {eta:4.0f} s ")
        else:
            self.stream.write(f"import: {self.done}/{self.total} files ({fraction:.0%}), "
                              f"{rate:.1f} MB/s\n")
        self.stream.flush()

    def finish(self) -> None:
        if self._tty:
            self.stream.write("\n")
            self.stream.flush()


@dataclass(frozen=True)
class NodeAddress:
    host: str
    port: int
    ae_title: str
    calling_ae_title: str
    timeout: float = 30.0


class NodeLink:
    """One association to the node at a time, renewed when new kinds of files appear."""

    def __init__(self, node: NodeAddress) -> None:
        dimse_reactor.install()  # no Nagle stalls or polling delays per instance sent
        self.node = node
        self._assoc: Any = None
        self.accepted: set[tuple[str, str]] = set()
        self.proposed: set[tuple[str, str]] = set()

    def ensure(self, pairs: set[tuple[str, str]]) -> None:
        """Have an association that proposed every (SOP class, transfer syntax) pair."""
        if self._assoc is not None and self._assoc.is_established and pairs <= self.proposed:
            return
        self.close()
        ae = AE(ae_title=self.node.calling_ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.connection_timeout = self.node.timeout
        for context in _contexts(pairs):
            ae.add_requested_context(context.abstract_syntax, list(context.transfer_syntaxes))
        assoc = ae.associate(self.node.host, self.node.port, ae_title=self.node.ae_title)
        where = f"{self.node.ae_title}@{self.node.host}:{self.node.port}"
        if assoc.is_rejected and assoc.acceptor.primitive is not None:
            rj = assoc.acceptor.primitive
            words = describe_rejection(int(rj.result), int(rj.result_source), int(rj.diagnostic))
            raise NodeUnreachableError(f"the node at {where} rejected the association ({words})")
        if not assoc.is_established:
            raise NodeUnreachableError(f"cannot reach the node at {where} (is it running?)")
        self._assoc = assoc
        self.proposed = set(pairs)
        self.accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                         for cx in assoc.accepted_contexts}

    def send(self, candidate: Candidate) -> tuple[StatusCategory, str]:
        """Send one file as it is; the status class and its description."""
        if (candidate.sop_class_uid, candidate.transfer_syntax_uid) not in self.accepted:
            return (StatusCategory.PERMANENT_FAILURE,
                    "the node accepts no presentation context for this SOP class and "
                    "transfer syntax")
        try:
            response = self._assoc.send_c_store(candidate.path)
        except (OSError, ValueError, AttributeError) as exc:
            return StatusCategory.PERMANENT_FAILURE, f"cannot send: {exc}"
        if response is None or "Status" not in response:
            self.close()
            return StatusCategory.TRANSIENT_FAILURE, "no response from the node"
        status = int(response.Status)
        comment = response.get("ErrorComment")
        return classify(status), describe(status) + (f": {comment}" if comment else "")

    def close(self) -> None:
        if self._assoc is not None and self._assoc.is_established:
            self._assoc.release()
        self._assoc = None


def _contexts(pairs: set[tuple[str, str]]) -> list[ProposedContext]:
    return contexts_for(sorted(pairs), decompress=False)[:MAX_CONTEXTS]


def _batches(items: Iterable[Path], size: int) -> Iterator[list[Path]]:
    batch: list[Path] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def run_import(
    paths: list[Path], node: NodeAddress, engine: Engine | None,
    progress: Progress | None = None, warn: Callable[[str], None] = lambda text: None,
    *, send_changed: bool = False,
) -> ImportSummary:
    """Import *paths*; raises NodeUnreachableError if the node cannot be reached."""
    _config.STORE_SEND_CHUNKED_DATASET = True  # send each file's bytes as they are
    importer = _Importer(node, engine, progress, warn, send_changed=send_changed)
    try:
        for batch in _batches(walk(paths), _BATCH):
            candidates = importer.not_stored(importer.readable(batch))
            importer.propose({(c.sop_class_uid, c.transfer_syntax_uid) for c in candidates})
            for candidate in candidates:
                importer.send(candidate)
    finally:
        importer.link.close()
    return importer.summary


class _Importer:
    def __init__(self, node: NodeAddress, engine: Engine | None, progress: Progress | None,
                 warn: Callable[[str], None], *, send_changed: bool) -> None:
        self.send_changed = send_changed
        self.link = NodeLink(node)
        self.engine = engine
        self.progress = progress
        self.warn = warn
        self.summary = ImportSummary()
        self.seen: set[tuple[str, str]] = set()

    def _advance(self, size: int = 0) -> None:
        if self.progress is not None:
            self.progress.advance(size)

    def readable(self, batch: list[Path]) -> list[Candidate]:
        """The batch's readable files not seen earlier in this import."""
        candidates = []
        for path in batch:
            found = scan(path)
            if isinstance(found, str):
                self.summary.failed.append((path, found))
                self._advance()
            elif (found.sop_instance_uid, found.sha256) in self.seen:
                self.summary.duplicates += 1
                self._advance()
            else:
                self.seen.add((found.sop_instance_uid, found.sha256))
                candidates.append(found)
        return candidates

    def not_stored(self, candidates: list[Candidate]) -> list[Candidate]:
        """The candidates the index does not already hold with the same content."""
        if self.engine is None or not candidates:
            return candidates
        try:
            stored = stored_digests(self.engine, [c.sop_instance_uid for c in candidates])
        except SQLAlchemyError as exc:
            self.warn(f"cannot check the index for duplicates ({describe_error(exc)}); "
                      "sending everything, the node recognises duplicates itself")
            self.engine = None
            return candidates
        fresh = []
        for candidate in candidates:
            digest = stored.get(candidate.sop_instance_uid)
            if digest is None or (self.send_changed and digest != candidate.sha256):
                fresh.append(candidate)
                continue
            self.summary.duplicates += 1
            if digest != candidate.sha256:
                self.summary.changed += 1
            self._advance()
        return fresh

    def propose(self, pairs: set[tuple[str, str]]) -> None:
        """Before a batch: one association for all of its kinds of files if they fit."""
        if not pairs or pairs <= self.link.proposed:
            return
        wanted = self.link.proposed | pairs
        if len(wanted) > _PAIRS_PER_ASSOCIATION:
            wanted = set(sorted(pairs)[:_PAIRS_PER_ASSOCIATION])
        self.link.ensure(wanted)

    def send(self, candidate: Candidate) -> None:
        link, summary = self.link, self.summary
        pair = (candidate.sop_class_uid, candidate.transfer_syntax_uid)
        if pair in link.proposed:
            link.ensure(link.proposed)
        elif len(link.proposed) < _PAIRS_PER_ASSOCIATION:
            link.ensure(link.proposed | {pair})
        else:
            link.ensure({pair})
        category, detail = link.send(candidate)
        if category is StatusCategory.TRANSIENT_FAILURE:
            link.ensure(link.proposed)  # e.g. the association was lost: once more, anew
            category, detail = link.send(candidate)
        if category in (StatusCategory.SUCCESS, StatusCategory.WARNING):
            summary.imported += 1
            summary.bytes_sent += candidate.size
            if category is StatusCategory.WARNING:
                summary.warnings.append((candidate.path, detail))
        else:
            summary.failed.append((candidate.path, f"refused by the node: {detail}"))
        self._advance(candidate.size)


def count_files(paths: Iterable[Path]) -> int:
    return sum(1 for _ in walk(paths))
