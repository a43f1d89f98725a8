"""Make third-party test servers listen on loopback only (see native/loopback_bind.c)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).parent / "native" / "loopback_bind.c"
_built: dict[str, Path] = {}


def loopback_preload() -> dict[str, str]:
    """Environment entries that confine a child process's listening sockets to loopback."""
    if "lib" not in _built:
        compiler = shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            raise RuntimeError("a C compiler is needed to build the loopback shim")
        target = Path(tempfile.mkdtemp(prefix="gw-loopback-")) / "loopback_bind.so"
        subprocess.run(
            [compiler, "-shared", "-fPIC", "-O2", "-o", str(target), str(SOURCE), "-ldl"],
            check=True,
            capture_output=True,
        )
        _built["lib"] = target
    return {"LD_PRELOAD": str(_built["lib"])}
