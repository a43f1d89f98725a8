"""Medians, ratios against the issue's targets, the printed table, JSON and README output."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.measure import Measurement

README_START = "<!-- results:start -->"
README_END = "<!-- results:end -->"
MB = 1024 * 1024
RSS_LIMIT_MB = 300
SCALING_TARGET = 0.9
# Measured for ingest only: storescp keeps no index to forward from; the floor is the
# receive path's durable writes alone.
INGEST_ONLY = ("storescp", "floor")
# The targets: gateway time / Orthanc time at most this.
RATIO_TARGETS = {
    ("ingest", "ct300"): 1.0,
    ("ingest", "small2000"): 1.0,
    ("ingest", "par8"): 1.0,
    ("ingest", "big1"): 1.0,
    ("route", "ct300"): 0.8,
    ("route", "small2000"): 0.8,
}


@dataclass
class Row:
    """One line of the results table: a workload in one mode."""

    mode: str
    workload: str
    medians: dict[str, float | None]
    failures: dict[str, int]
    ratio: float | None
    target: float | None
    met: bool | None
    rss_main_mb: float | None
    rss_total_mb: float | None
    rss_met: bool | None
    uploaded: float | None = None
    """Ingest: median seconds until the gateway's object store held every instance."""


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(measurements: list[Measurement], targets: list[str]) -> list[Row]:
    """Medians over the successful runs of each (mode, workload, target)."""
    rows = []
    cases = dict.fromkeys((m.mode, m.workload) for m in measurements if m.mode != "scaling")
    for mode, workload in cases:
        runs = [m for m in measurements if (m.mode, m.workload) == (mode, workload)]
        medians = {t: median([m.seconds for m in runs if m.target == t and m.seconds is not None])
                   for t in targets}
        failures = {t: sum(1 for m in runs if m.target == t and m.error) for t in targets}
        gateway, orthanc = medians.get("gateway"), medians.get("orthanc")
        ratio = gateway / orthanc if gateway is not None and orthanc else None
        target = RATIO_TARGETS.get((mode, workload))
        met = None if ratio is None or target is None else ratio <= target
        rss = [m for m in runs if m.target == "gateway" and m.rss_total is not None]
        rss_main = max((m.rss_main or 0) / MB for m in rss) if rss else None
        rss_total = max((m.rss_total or 0) / MB for m in rss) if rss else None
        rss_met = (rss_total < RSS_LIMIT_MB
                   if workload == "big1" and mode == "ingest" and rss_total is not None else None)
        uploaded = median([float(m.detail["uploaded_seconds"]) for m in runs
                           if m.target == "gateway" and m.seconds is not None
                           and "uploaded_seconds" in m.detail])
        rows.append(Row(mode, workload, medians, failures, ratio, target, met,
                        rss_main, rss_total, rss_met, uploaded))
    return rows


def summarize_scaling(measurements: list[Measurement]) -> list[dict[str, Any]]:
    """Per database: median ingest rate with an empty and a 100k index, and their ratio."""
    out = []
    kinds = dict.fromkeys(m.target.split("-")[1] for m in measurements if m.mode == "scaling")
    for kind in kinds:
        rates: dict[str, float | None] = {}
        failures = 0
        for state in ("empty", "100k"):
            runs = [m for m in measurements
                    if m.mode == "scaling" and m.target == f"gateway-{kind}-{state}"]
            failures += sum(1 for m in runs if m.error)
            rates[state] = median([m.instances / m.seconds for m in runs if m.seconds])
        empty, full = rates["empty"], rates["100k"]
        ratio = full / empty if empty and full else None
        out.append({"database": kind, "rate_empty": empty, "rate_100k": full, "ratio": ratio,
                    "target": SCALING_TARGET, "failures": failures,
                    "met": None if ratio is None else ratio >= SCALING_TARGET})
    return out


def _cell(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _met(value: bool | None) -> str:
    return "—" if value is None else ("yes" if value else "**no**")


def table(rows: list[Row], scaling: list[dict[str, Any]], targets: list[str]) -> str:
    """The results as a Markdown table (printed and written into bench/README.md)."""
    head = ["case", *[f"{t} s" for t in targets], "gateway/orthanc", "target", "met",
            "gateway peak RSS MB (main / tree)", "gateway until uploaded s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [f"{row.workload} {row.mode}"]
        for t in targets:
            text = _cell(row.medians.get(t))
            if row.failures.get(t):
                text += f" ({row.failures[t]} failed)"
            cells.append(text if row.mode == "ingest" or t not in INGEST_ONLY else "n/a")
        rss = ("—" if row.rss_total_mb is None
               else f"{row.rss_main_mb:.0f} / {row.rss_total_mb:.0f}")
        if row.rss_met is not None:
            rss += f" (target < {RSS_LIMIT_MB}: {_met(row.rss_met)})"
        cells += [_cell(row.ratio), "—" if row.target is None else f"≤ {row.target}",
                  _met(row.met), rss, _cell(row.uploaded)]
        lines.append("| " + " | ".join(cells) + " |")
    if scaling:
        lines += ["", "| index scaling (small2000 into the gateway) | empty index inst/s "
                  "| 100k instances inst/s | 100k/empty | target | met |",
                  "|---|---|---|---|---|---|"]
        for entry in scaling:
            failed = f" ({entry['failures']} failed)" if entry["failures"] else ""
            lines.append(
                f"| {entry['database']}{failed} | {_cell(entry['rate_empty'], 0)} "
                f"| {_cell(entry['rate_100k'], 0)} | {_cell(entry['ratio'])} "
                f"| ≥ {entry['target']} | {_met(entry['met'])} |")
    return "\n".join(lines)


def _first_line(command: list[str]) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable: {exc}"
    output = (result.stdout or result.stderr).strip().splitlines()
    return output[0] if output else ""


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _dcmtk_version() -> str:
    """The version from storescu's banner, e.g. 3.6.7."""
    found = re.search(r"v(\d[\d.]*)", _first_line(["/usr/bin/storescu", "--version"]))
    return found.group(1) if found else "unknown"


def source_fingerprint(repository: Path) -> str:
    """SHA-256 over the gateway's Python sources as they are on disk (committed or not),
    so results can be matched to the exact code measured."""
    digest = hashlib.sha256()
    for path in sorted((repository / "gateway").rglob("*.py")):
        digest.update(str(path.relative_to(repository)).encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def machine_info(repository: Path) -> dict[str, Any]:
    """What the numbers were measured on."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dirty = _first_line(["git", "-C", str(repository), "status", "--porcelain"])
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "pynetdicom": _version("pynetdicom"),
        "pydicom": _version("pydicom"),
        "sqlalchemy": _version("sqlalchemy"),
        "orthanc": _first_line(["Orthanc", "--version"]),
        "dcmtk": _dcmtk_version(),
        "git_commit": _first_line(["git", "-C", str(repository), "rev-parse", "HEAD"]),
        "git_dirty": bool(dirty),
        "gateway_sources_sha256": source_fingerprint(repository),
    }


def write_json(directory: Path, payload: dict[str, Any], started: dt.datetime) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    return path


def results_payload(measurements: list[Measurement], rows: list[Row],
                    scaling: list[dict[str, Any]], info: dict[str, Any],
                    options: dict[str, Any]) -> dict[str, Any]:
    return {
        "options": options,
        "machine": info,
        "summary": [asdict(row) for row in rows],
        "scaling": scaling,
        "measurements": [asdict(m) for m in measurements],
    }


def update_readme(readme: Path, table_text: str, header: str) -> None:
    """Replace the text between the result markers (appended if they are missing)."""
    block = f"{README_START}\n{header}\n\n{table_text}\n{README_END}"
    text = readme.read_text() if readme.exists() else ""
    if README_START in text and README_END in text:
        before = text.split(README_START, 1)[0]
        after = text.split(README_END, 1)[1]
        text = before + block + after
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    readme.write_text(text)
