"""The durable-write floor: what acknowledging an instance only once it is on disk costs
on this machine when the instance is spooled as a file, with no DICOM, no Python DICOM
stack and no index logic.

For each instance of a study directory, in storescu's order, one after the other (a
sender waits for each response), it does what the gateway's receive path must do before
it may answer Success for an instance spooled as a file (those larger than
``storage.spool_in_index_max_bytes``; smaller ones go into the index commit itself, one
flush instead of three), and nothing else:

1. create a file in ``incoming/`` and write the instance's bytes to it;
2. ``fdatasync`` the file, rename it into ``ready/`` and ``fsync`` that directory;
3. insert one row into an SQLite index (WAL, ``synchronous=FULL``) and commit.

Run as ``python -m bench.floor --root DIR STUDY_DIR``, one process per study directory
(like the storescu senders), all sharing *DIR*. Orthanc and storescp write without
``fsync``; the column shows how much of the gateway's time this floor already is.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import uuid
from collections.abc import Sequence
from pathlib import Path

DATABASE = "index.db"
SCHEMA = "CREATE TABLE IF NOT EXISTS instance (name TEXT PRIMARY KEY, source TEXT NOT NULL)"


def open_index(root: Path) -> sqlite3.Connection:
    """The floor's index, set up as the gateway sets up SQLite."""
    connection = sqlite3.connect(root / DATABASE, timeout=60, isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")
    connection.execute(SCHEMA)
    return connection


def count(root: Path) -> int:
    """Instances recorded under *root*."""
    with open_index(root) as connection:
        return int(connection.execute("SELECT count(*) FROM instance").fetchone()[0])


def durable_write(root: Path, ready_fd: int, index: sqlite3.Connection, source: Path) -> None:
    """One instance, made durable and recorded."""
    data = source.read_bytes()
    incoming = root / "incoming" / uuid.uuid4().hex
    fd = os.open(incoming, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fdatasync(fd)
    finally:
        os.close(fd)
    name = f"{uuid.uuid4().hex}.dcm"
    incoming.rename(root / "ready" / name)
    os.fsync(ready_fd)
    index.execute("BEGIN IMMEDIATE")
    index.execute("INSERT INTO instance (name, source) VALUES (?, ?)", (name, source.name))
    index.execute("COMMIT")


def run(root: Path, study: Path) -> int:
    """Every ``*.dcm`` below *study*, in sorted order (storescu ``+sd +r`` sends them
    in directory order; the order does not change the cost)."""
    for directory in ("incoming", "ready"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    ready_fd = os.open(root / "ready", os.O_RDONLY | os.O_DIRECTORY)
    index = open_index(root)
    try:
        sources = sorted(study.rglob("*.dcm"))
        for source in sources:
            durable_write(root, ready_fd, index, source)
    finally:
        index.close()
        os.close(ready_fd)
    return len(sources)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("--root", type=Path, required=True, help="spool and index directory")
    parser.add_argument("study", type=Path, help="the instances to write, like storescu's")
    args = parser.parse_args(argv)
    run(args.root, args.study)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
