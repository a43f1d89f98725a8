"""``python -m bench.run``: the gateway against Orthanc and DCMTK storescp, side by side.

For each workload, each run, each receiver in an order that rotates per run: start the
receiver fresh, send with storescu, verify, stop, delete. Then medians, ratios against
the targets of the performance issue, a JSON record under ``bench/results/`` and the
table in ``bench/README.md``. See bench/README.md for the method.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from bench import measure, report, scaling, targets
from bench.measure import Context, Measurement
from bench.processes import BenchError, loopback_shim
from bench.workloads import WORKLOADS, Workload, ensure

BENCH_DIR = Path(__file__).resolve().parent
REPOSITORY = BENCH_DIR.parent
ALL_TARGETS = ("gateway", "orthanc", "storescp", "floor")
ROUTE_WORKLOADS = ("ct300", "small2000")
ROUTE_TARGETS = ("gateway", "orthanc")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--runs", type=int, default=3, help="repetitions per case (default 3)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help=f"comma-separated subset of {','.join(WORKLOADS)}")
    parser.add_argument("--targets", default=",".join(ALL_TARGETS),
                        help=f"comma-separated subset of {','.join(ALL_TARGETS)}")
    parser.add_argument("--skip-route", action="store_true", help="no route measurements")
    parser.add_argument("--skip-scaling", action="store_true",
                        help="no index-size scaling measurements")
    parser.add_argument("--work", type=Path, default=BENCH_DIR / "work",
                        help="workload cache and scratch directory (default bench/work)")
    parser.add_argument("--results", type=Path, default=BENCH_DIR / "results",
                        help="where the JSON results go (default bench/results)")
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep the server and sender logs of every run under WORK/logs")
    parser.add_argument("--no-readme", action="store_true",
                        help="do not rewrite the table in bench/README.md")
    args = parser.parse_args(argv)
    args.workload_list = _subset(parser, args.workloads, list(WORKLOADS), "workload")
    args.target_list = _subset(parser, args.targets, ALL_TARGETS, "target")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def _subset(parser: argparse.ArgumentParser, text: str, known: Sequence[str],
            what: str) -> list[str]:
    chosen = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in chosen if item not in known]
    if unknown or not chosen:
        parser.error(f"unknown {what}(s) {unknown}; choose from {', '.join(known)}")
    return [item for item in known if item in chosen]


def rotated(items: Sequence[str], run: int) -> list[str]:
    """Run 0: a b c; run 1: b c a; run 2: c a b: no receiver always goes first."""
    shift = run % len(items)
    return [*items[shift:], *items[:shift]]


def say(text: str) -> None:
    print(text, flush=True)


def _show(m: Measurement, runs: int) -> None:
    outcome = f"{m.seconds:.2f} s" if m.seconds is not None else f"FAILED: {m.error}"
    rss = f", peak RSS {m.rss_total / 2**20:.0f} MB" if m.rss_total else ""
    extra = "".join(f", {key} {value:.2f}" for key, value in m.detail.items()
                    if isinstance(value, float))
    say(f"  [{m.workload} {m.mode} run {m.run + 1}/{runs}] {m.target}: {outcome}{rss}{extra}")


def run_cases(ctx: Context, args: argparse.Namespace) -> list[Measurement]:
    """Ingest for every workload, then route, each alternating the receivers."""
    out: list[Measurement] = []
    plans: list[tuple[str, Workload, list[str], Callable[..., Measurement]]] = [
        ("ingest", WORKLOADS[name], args.target_list, measure.ingest)
        for name in args.workload_list
    ]
    route_targets = [t for t in ROUTE_TARGETS if t in args.target_list]
    if not args.skip_route and route_targets:
        plans += [("route", WORKLOADS[name], route_targets, measure.route)
                  for name in ROUTE_WORKLOADS if name in args.workload_list]
    for mode, workload, names, measure_one in plans:
        say(f"{workload.name} {mode}: {workload.description}")
        for run in range(args.runs):
            for name in rotated(names, run):
                result = measure_one(ctx, workload, name, run)
                _show(result, args.runs)
                out.append(result)
    return out


def run_scaling(ctx: Context, args: argparse.Namespace) -> list[Measurement]:
    """small2000 into an empty index and a 100k index, on SQLite and PostgreSQL."""
    out: list[Measurement] = []
    workload = WORKLOADS["small2000"]
    ensure(ctx.work, workload)
    makers: list[tuple[str, Callable[[Context], AbstractContextManager[
        dict[str, scaling.Template]]]]] = [
        ("sqlite", scaling.sqlite_templates), ("postgresql", scaling.postgres_templates)]
    for kind, make in makers:
        say(f"index scaling, {kind}: preparing the empty and the 100k-instance index")
        started = time.perf_counter()
        try:
            with make(ctx) as templates:
                say(f"  templates ready in {time.perf_counter() - started:.0f} s")
                for run in range(args.runs):
                    for state in rotated(scaling.STATES, run):
                        result = scaling.measure(ctx, workload, templates[state], state, run)
                        _show(result, args.runs)
                        out.append(result)
        except BenchError as exc:
            say(f"  index scaling on {kind} failed: {exc}")
            out.append(Measurement("small2000", "scaling", f"gateway-{kind}-empty", 0,
                                   workload.instances, error=str(exc)))
    return out


def _generate(ctx: Context, names: list[str]) -> None:
    for name in names:
        started = time.perf_counter()
        ensure(ctx.work, WORKLOADS[name])
        elapsed = time.perf_counter() - started
        if elapsed > 1:
            say(f"generated workload {name} in {elapsed:.0f} s")
    if "big1" in names and shutil.disk_usage(ctx.work).free < 6 * 2**30:
        raise BenchError(f"big1 needs about 6 GB free under {ctx.work}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started_at = dt.datetime.now(dt.UTC)
    clock = time.perf_counter()
    targets.require_tools()
    info = report.machine_info(REPOSITORY)
    work = args.work.resolve()
    ctx = Context(work, loopback_shim(work / "native"), keep_logs=args.keep_logs)
    ctx.scratch.mkdir(parents=True, exist_ok=True)
    _generate(ctx, args.workload_list)
    measurements = run_cases(ctx, args)
    if not args.skip_scaling:
        measurements += run_scaling(ctx, args)
    elapsed = time.perf_counter() - clock
    at_end = report.machine_info(REPOSITORY)
    for key in ("git_commit", "gateway_sources_sha256"):
        if at_end[key] != info[key]:
            info[f"{key}_at_end"] = at_end[key]
            say(f"warning: {key} changed during the run ({info[key]} -> {at_end[key]})")
    options = {"runs": args.runs, "workloads": args.workload_list, "targets": args.target_list,
               "route": not args.skip_route, "scaling": not args.skip_scaling,
               "gateway_command": targets.GATEWAY,
               "started_at": started_at.isoformat(), "duration_seconds": round(elapsed, 1)}
    _report(args, measurements, info, options, _header(started_at, args, info, elapsed))
    failed = [m for m in measurements if m.error]
    for m in failed:
        say(f"FAILED {m.workload} {m.mode} {m.target} run {m.run + 1}: {m.error} "
            f"(logs: {m.detail.get('logs', '-')})")
    return 1 if failed else 0


def _report(args: argparse.Namespace, measurements: list[Measurement], info: dict[str, Any],
            options: dict[str, Any], header: str) -> None:
    """Print the table; write the JSON and (unless told not to) the README table."""
    rows = report.summarize(measurements, args.target_list)
    scaling_rows = report.summarize_scaling(measurements)
    text = report.table(rows, scaling_rows, args.target_list)
    path = report.write_json(
        args.results, report.results_payload(measurements, rows, scaling_rows, info, options),
        dt.datetime.fromisoformat(options["started_at"]))
    say("\n" + header + "\n\n" + text + "\n")
    say(f"results: {path}")
    if not args.no_readme:
        report.update_readme(BENCH_DIR / "README.md", text, header)


def _header(started_at: dt.datetime, args: argparse.Namespace, info: dict[str, object],
            elapsed: float) -> str:
    return (
        f"Medians of {args.runs} run(s), seconds; {started_at:%Y-%m-%d %H:%M} UTC, "
        f"{info['cpu_count']} CPUs ({info['cpu_model']}), commit "
        f"{str(info['git_commit'])[:10]}{' + uncommitted changes' if info['git_dirty'] else ''}, "
        f"{info['orthanc']}, DCMTK {info['dcmtk']}, pynetdicom {info['pynetdicom']}; "
        f"whole run {elapsed / 60:.1f} min."
        + (" The gateway's sources changed during the run."
           if "gateway_sources_sha256_at_end" in info else "")
    )


if __name__ == "__main__":
    sys.exit(main())
