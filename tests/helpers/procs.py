"""What Linux's /proc says about the processes a test started."""

from __future__ import annotations

from pathlib import Path


def child_pids(pid: int) -> list[int]:
    """The direct children of *pid* (none once it is gone)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            children.extend(int(child) for child in task.read_text().split())
        except OSError:
            continue
    return children
