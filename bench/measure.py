"""One measurement: start a fresh receiver, send a workload with storescu, verify, stop.

Ingest time is the wall time of the storescu process(es), launch to exit, and counts only
when every sender exited with status 0 and the receiver holds every instance afterwards.
Route time runs from the storescu launch until the last instance is at the destination.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench import floor, targets
from bench.processes import LOOPBACK, BenchError, Senders, dcmtk_env, wait_until
from bench.workloads import Workload, study_dirs

STORESCU = "/usr/bin/storescu"
ROUTE_POLL_SECONDS = 0.01
UPLOAD_POLL_SECONDS = 0.05


@dataclass
class Measurement:
    """One timed run; ``seconds`` is None when it failed (``error`` says why)."""

    workload: str
    mode: str
    """``ingest``, ``route`` or ``scaling``."""
    target: str
    run: int
    instances: int
    seconds: float | None = None
    error: str | None = None
    rss_main: int | None = None
    """Peak RSS (VmHWM) of the receiver's main process, bytes."""
    rss_total: int | None = None
    """Peak RSS summed over the receiver's process tree, bytes."""
    detail: dict[str, float | str] = field(default_factory=dict)


@dataclass(frozen=True)
class Context:
    """What every measurement needs: where the workloads and scratch space are."""

    work: Path
    shim: dict[str, str]
    keep_logs: bool = False
    """Keep the logs of successful runs too (under ``logs/``)."""

    @property
    def scratch(self) -> Path:
        return self.work / "run-tmp"

    @property
    def failed(self) -> Path:
        return self.work / "failed"

    @property
    def logs(self) -> Path:
        return self.work / "logs"


def _copy_logs(source: Path, destination: Path) -> None:
    for log in source.rglob("*.log"):
        target = destination / log.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(log, target)


def storescu_command(directory: Path, calling_ae: str, called_ae: str, port: int) -> list[str]:
    """Send every ``*.dcm`` below *directory* on one association."""
    return [STORESCU, "+sd", "+r", "+sp", "*.dcm", "-aet", calling_ae, "-aec", called_ae,
            LOOPBACK, str(port), str(directory)]


def timeout_for(workload: Workload) -> float:
    """Generous bounds: 5 MB/s and 20 instances/s would already be pathological here."""
    return 120 + workload.total_bytes / 5e6 + workload.instances / 20


def senders(ctx: Context, workload: Workload, target: targets.Target, calling_ae: str,
            log_dir: Path) -> Senders:
    commands = [storescu_command(directory, calling_ae, target.ae_title, target.port)
                for directory in study_dirs(ctx.work, workload)]
    return Senders(commands, log_dir, dcmtk_env())


def verify_count(target: targets.Target, expected: int, what: str = "") -> None:
    count = target.count()
    if count != expected:
        raise BenchError(f"{target.name}{what} holds {count} of {expected} instances")


@contextmanager
def run_directory(ctx: Context, name: str, measurement: Measurement) -> Iterator[Path]:
    """A fresh directory for one measurement, deleted afterwards; a failure is recorded in
    *measurement* and its logs are kept under ``failed/``."""
    path = ctx.scratch / name
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    try:
        yield path
        if ctx.keep_logs:
            _copy_logs(path, ctx.logs / name)
    except Exception as exc:
        measurement.seconds = None
        measurement.error = f"{type(exc).__name__}: {exc}"
        kept = ctx.failed / f"{name}-{int(time.time())}"
        _copy_logs(path, kept)
        kept.mkdir(parents=True, exist_ok=True)
        (kept / "traceback.txt").write_text(traceback.format_exc())
        measurement.detail["logs"] = str(kept)
    finally:
        shutil.rmtree(path, ignore_errors=True)


def start_target(ctx: Context, name: str, run_dir: Path,
                 ) -> AbstractContextManager[targets.Target]:
    starters: dict[str, Callable[[], AbstractContextManager[targets.Target]]] = {
        "gateway": lambda: targets.gateway(run_dir),
        "orthanc": lambda: targets.orthanc(run_dir, ctx.shim),
        "storescp": lambda: targets.storescp(run_dir / "received", ctx.shim),
    }
    return starters[name]()


def ingest(ctx: Context, workload: Workload, target_name: str, run: int) -> Measurement:
    """Send *workload* to a fresh *target_name*; time the senders."""
    if target_name == "floor":
        return ingest_floor(ctx, workload, run)
    result = Measurement(workload.name, "ingest", target_name, run, workload.instances)
    with run_directory(ctx, f"{workload.name}-ingest-{target_name}-{run}", result) as run_dir, \
            start_target(ctx, target_name, run_dir) as target:
        calling = targets.INGEST_CALLING_AE
        with senders(ctx, workload, target, calling, run_dir / "senders") as running:
            result.seconds = running.wait(timeout_for(workload))
        verify_count(target, workload.instances)
        if isinstance(target, targets.Gateway):
            # The gateway acknowledges once an instance is durable in its spool; the copy
            # to its object store follows (after the burst: uploads yield to receiving).
            # The time until every instance is there is recorded beside the ingest time.
            wait_until(lambda: target.uploaded() >= workload.instances,
                       timeout_for(workload) + 120, "every instance in the object store",
                       UPLOAD_POLL_SECONDS)
            result.detail["uploaded_seconds"] = time.perf_counter() - running.start
        result.rss_main, result.rss_total = target.peak_rss()
    return result


def ingest_floor(ctx: Context, workload: Workload, run: int) -> Measurement:
    """The durable-write floor (``bench/floor.py``): one process per study directory in
    place of each storescu, timed the same way."""
    result = Measurement(workload.name, "ingest", "floor", run, workload.instances)
    with run_directory(ctx, f"{workload.name}-ingest-floor-{run}", result) as run_dir:
        root = run_dir / "floor"
        root.mkdir()
        floor.count(root)  # the index exists before the writers start
        commands = [[sys.executable, floor.__file__, "--root", str(root), str(directory)]
                    for directory in study_dirs(ctx.work, workload)]
        with Senders(commands, run_dir / "senders", dict(os.environ)) as running:
            result.seconds = running.wait(timeout_for(workload))
        written = floor.count(root)
        if written != workload.instances:
            raise BenchError(f"floor wrote {written} of {workload.instances} instances")
    return result


def route(ctx: Context, workload: Workload, target_name: str, run: int) -> Measurement:
    """storescu -> *target_name* -> storescp; time until the last instance is there."""
    result = Measurement(workload.name, "route", target_name, run, workload.instances)
    measure = route_gateway if target_name == "gateway" else route_orthanc
    with run_directory(ctx, f"{workload.name}-route-{target_name}-{run}", result) as run_dir, \
            targets.storescp(run_dir / "destination", ctx.shim, ae_title=targets.DESTINATION_AE,
                             log_path=run_dir / "destination.log", fork=True) as destination:
        measure(ctx, workload, run_dir, destination, result)
        verify_count(destination, workload.instances, " (destination)")
    return result


def route_gateway(ctx: Context, workload: Workload, run_dir: Path,
                  destination: targets.StoreSCP, result: Measurement) -> None:
    """Forwarding overlaps receiving: poll the destination until it has everything and
    the gateway has recorded every delivery as done (so the last file is complete)."""
    expected = workload.instances
    timeout = 2 * timeout_for(workload)
    with targets.gateway(run_dir / "gateway", destination_port=destination.port) as node, \
            senders(ctx, workload, node, targets.ROUTE_CALLING_AE, run_dir / "senders") as running:

        def arrived() -> bool:
            running.poll()
            node.server.check_alive()
            return destination.count() >= expected and node.forwarded() >= expected

        wait_until(arrived, timeout, "the last instance at the destination", ROUTE_POLL_SECONDS)
        result.seconds = time.perf_counter() - running.start
        result.detail["ingest_seconds"] = running.wait(timeout)
        verify_count(node, expected)
        result.rss_main, result.rss_total = node.peak_rss()


def route_orthanc(ctx: Context, workload: Workload, run_dir: Path,
                  destination: targets.StoreSCP, result: Measurement) -> None:
    """Orthanc's best equivalent: ingest, then a synchronous store of the study."""
    timeout = timeout_for(workload)
    with targets.orthanc(run_dir / "orthanc", ctx.shim,
                         destination_port=destination.port) as server:
        with senders(ctx, workload, server, targets.ROUTE_CALLING_AE,
                     run_dir / "senders") as running:
            result.detail["ingest_seconds"] = running.wait(timeout)
        verify_count(server, workload.instances)
        studies = server.request("/studies")
        server.request("/modalities/dest/store", {"Resources": studies, "Synchronous": True},
                       timeout=timeout)
        result.seconds = time.perf_counter() - running.start
        result.rss_main, result.rss_total = server.peak_rss()
