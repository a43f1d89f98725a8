"""The benchmark's durable-write floor writes and records every instance, nothing else."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench import floor
from tests.helpers.data import make_study


def test_the_floor_makes_each_instance_durable_and_records_it(tmp_path: Path) -> None:
    study = tmp_path / "study"
    sources = make_study(study, 3)
    root = tmp_path / "floor"
    root.mkdir()
    assert floor.count(root) == 0
    # Run as the benchmark runs it: the file by path, one process per study.
    subprocess.run([sys.executable, floor.__file__, "--root", str(root), str(study)],
                   check=True, timeout=60)
    assert floor.count(root) == 3
    assert list((root / "incoming").iterdir()) == []
    written = sorted(path.read_bytes() for path in (root / "ready").iterdir())
    assert written == sorted(source.read_bytes() for source in sources)
