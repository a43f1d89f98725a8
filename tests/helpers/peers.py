"""Destinations for forwarding tests: a scriptable pynetdicom SCP in its own process."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.helpers.net import free_port, wait_for_port


@dataclass
class StatusPeer:
    port: int
    ae_title: str
    directory: Path
    process: subprocess.Popen[bytes]

    def script(self, **settings: Any) -> None:
        """Set what the peer answers from now on (see status_scp.py)."""
        (self.directory / "control.json").write_text(json.dumps(settings))

    def received(self) -> list[tuple[str, int, str]]:
        """(SOP Instance UID, status answered, transfer syntax) per request, in order."""
        log = self.directory / "received.log"
        if not log.exists():
            return []
        rows = []
        for line in log.read_text().splitlines():
            uid, status, syntax = line.split()
            rows.append((uid, int(status), syntax))
        return rows

    def stored(self) -> Counter[str]:
        """How many times each SOP instance was accepted."""
        return Counter(uid for uid, status, _ in self.received() if status in (0, 0xB000))

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
    uncompressed_only: bool = False, reject: bool = False, **script: Any,
) -> Iterator[StatusPeer]:
    directory.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    args = [sys.executable, "-m", "tests.helpers.status_scp", str(port), ae_title, str(directory)]
    if uncompressed_only:
        args.append("--uncompressed-only")
    if reject:
        args.append("--reject")
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
