"""DCMTK command-line tools as real DICOM peers (modality and simple PACS).

The Debian binaries are called by absolute path (pynetdicom installs its own
``storescu``/``storescp`` apps into the virtualenv). ``TCP_NODELAY=1`` is set for every
DCMTK process, otherwise loopback transfers stall on Nagle delays.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.loopback import loopback_preload
from tests.helpers.net import LOOPBACK, free_port, wait_for_port
from tests.helpers.procs import child_pids

DCMTK_BIN = Path("/usr/bin")
STORESCU = DCMTK_BIN / "storescu"
ECHOSCU = DCMTK_BIN / "echoscu"
STORESCP = DCMTK_BIN / "storescp"

# storescu option that proposes a given transfer syntax (plus uncompressed fallbacks).
PROPOSE_OPTION = {
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
}


def available() -> bool:
    return STORESCU.exists() and STORESCP.exists() and ECHOSCU.exists()


def dcmtk_env() -> dict[str, str]:
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


@dataclass
class Result:
    returncode: int
    output: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def run(args: Sequence[str | os.PathLike[str]], timeout: float = 120) -> Result:
    proc = subprocess.run(
        [str(a) for a in args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dcmtk_env(),
        check=False,
    )
    return Result(proc.returncode, proc.stdout + proc.stderr)


def storescu(
    port: int,
    files: Sequence[str | os.PathLike[str]],
    *,
    calling: str = "STORESCU",
    called: str = "GATEWAY",
    options: Sequence[str] = (),
    timeout: float = 300,
) -> Result:
    """Send *files* with DCMTK storescu; ``-v`` so per-file outcomes are in the output."""
    return run(
        [STORESCU, "-v", "-aet", calling, "-aec", called, *options, LOOPBACK, str(port), *files],
        timeout=timeout,
    )


def echoscu(port: int, *, calling: str = "ECHOSCU", called: str = "GATEWAY") -> Result:
    return run([ECHOSCU, "-v", "-aet", calling, "-aec", called, LOOPBACK, str(port)], timeout=30)


@dataclass
class StoreSCP:
    """A running DCMTK storescp writing what it receives, bit-preserving, to *directory*."""

    port: int
    ae_title: str
    directory: Path
    process: subprocess.Popen[bytes]

    def files(self) -> list[Path]:
        """The files storescp has finished writing (it writes in place, so a file it
        still holds open is incomplete)."""
        writing = _open_files(self.process.pid)
        return sorted(p for p in self.directory.rglob("*")
                      if p.is_file() and str(p.resolve()) not in writing)


def _open_files(pid: int) -> set[str]:
    """Paths held open by *pid* and its children (storescp ``--fork``)."""
    paths = set()
    for each in [pid, *child_pids(pid)]:
        for fd in Path(f"/proc/{each}/fd").glob("*"):
            try:
                paths.add(str(fd.readlink()))
            except OSError:
                continue
    return paths


@contextmanager
def storescp(
    directory: Path, *, ae_title: str = "STORESCP", port: int | None = None,
    options: Sequence[str] = (),
) -> Iterator[StoreSCP]:
    """Run storescp on a free loopback port for the duration of the block."""
    directory.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log = (directory.parent / f"storescp-{port}.log").open("wb")
    process = subprocess.Popen(
        [str(STORESCP), "+B", "-aet", ae_title, "-od", str(directory),
         "+xa", *options, str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**dcmtk_env(), **loopback_preload()},  # storescp has no listen-address option
    )
    try:
        wait_for_port(port)
        yield StoreSCP(port, ae_title, directory, process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        log.close()


def require() -> None:
    import pytest

    if not available() or shutil.which("storescu") is None:
        pytest.fail("DCMTK is not installed: run `make setup` (apt-get install dcmtk)")
