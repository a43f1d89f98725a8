"""Destinations for forwarding tests: a scriptable pynetdicom SCP in its own process."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.helpers.net import free_port, wait_for_port


@dataclass(frozen=True)
class Request:
    """One C-STORE as the peer saw it (see status_scp.py)."""

    sop_instance_uid: str
    status: int
    """The status answered; -1 when the peer aborted the association instead."""
    transfer_syntax: str
    association: int
    """Number of the association it came on, counted from 1 in order of establishment."""
    open_associations: int
    """Associations open when it arrived, its own included."""
    in_progress: int
    """C-STOREs being handled when it arrived, itself included."""


@dataclass
class StatusPeer:
    port: int
    ae_title: str
    directory: Path
    process: subprocess.Popen[bytes]

    def script(self, **settings: Any) -> None:
        """Set what the peer answers from now on (see status_scp.py)."""
        (self.directory / "control.json").write_text(json.dumps(settings))

    def requests(self) -> list[Request]:
        """Every C-STORE request, in the order answered."""
        log = self.directory / "received.log"
        if not log.exists():
            return []
        rows = []
        # Only complete lines: the peer may be writing the next one as we read.
        for line in log.read_text().split("\n")[:-1]:
            uid, status, syntax, association, open_count, in_progress = line.split()
            rows.append(Request(uid, int(status), syntax, int(association), int(open_count),
                                int(in_progress)))
        return rows

    def received(self) -> list[tuple[str, int, str]]:
        """(SOP Instance UID, status answered, transfer syntax) per request, in order."""
        return [(r.sop_instance_uid, r.status, r.transfer_syntax) for r in self.requests()]

    def stored(self) -> Counter[str]:
        """How many times each SOP instance was accepted (success or a warning)."""
        return Counter(uid for uid, status, _ in self.received()
                       if status in (0, 0xB000, 0xB006, 0xB007))

    def files(self) -> dict[str, Path]:
        return {p.name.split(".dcm")[0].rsplit(".", 1)[0]: p for p in self.directory.glob("*.dcm")}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@contextmanager
def status_peer(
    directory: Path, *, ae_title: str = "PEER", port: int | None = None,
    uncompressed_only: bool = False, reject: bool = False,
    sop_classes: Sequence[str] = (), **script: Any,
) -> Iterator[StatusPeer]:
    """A status_scp.py peer; *sop_classes* limits the storage SOP classes it accepts."""
    directory.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    args = [sys.executable, "-m", "tests.helpers.status_scp", str(port), ae_title, str(directory)]
    if uncompressed_only:
        args.append("--uncompressed-only")
    if reject:
        args.append("--reject")
    if sop_classes:
        args.append("--sop-classes=" + ",".join(sop_classes))
    log = (directory.parent / f"peer-{ae_title}-{port}.log").open("ab")
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                               cwd=Path(__file__).parent.parent.parent)
    log.close()
    peer = StatusPeer(port, ae_title, directory, process)
    if script:
        peer.script(**script)
    try:
        wait_for_port(port, timeout=30)
        yield peer
    finally:
        peer.stop()
