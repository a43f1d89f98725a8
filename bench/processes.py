"""Processes of the benchmark: start in their own process group, wait, measure, stop.

Every server is started with its output in a log file, waited for with a deadline, and
stopped (SIGTERM to its process group, then SIGKILL) however the measurement ends.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

LOOPBACK = "127.0.0.1"
# The same shim the tests load (one copy of the C source).
SHIM_SOURCE = Path(__file__).parent.parent / "tests" / "helpers" / "native" / "loopback_bind.c"


class BenchError(Exception):
    """A measurement failed (timeout, lost instances, a process died): not a number."""


def free_port() -> int:
    """A TCP port free on loopback right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def wait_until(
    condition: Callable[[], bool], timeout: float, message: str, interval: float = 0.05
) -> None:
    """Poll *condition*; raise :class:`BenchError` naming *message* after *timeout* s."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {message}")
        time.sleep(interval)


def listening(port: int) -> bool:
    """Whether something listens on *port* (read from /proc: no probe connection that
    would show up in a server's association log)."""
    wanted = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[1].endswith(wanted) and fields[3] == "0A":
                return True
    return False


def dcmtk_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of every DCMTK and Orthanc process: Nagle off on loopback."""
    return {**os.environ, "TCP_NODELAY": "1", **(extra or {})}


def loopback_shim(build_dir: Path) -> dict[str, str]:
    """``LD_PRELOAD`` entry confining wildcard binds to loopback (Orthanc and storescp
    cannot be told where to listen); built once into *build_dir*."""
    target = build_dir / "loopback_bind.so"
    if not target.exists() or target.stat().st_mtime < SHIM_SOURCE.stat().st_mtime:
        compiler = shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            raise BenchError("a C compiler (cc) is needed to build the loopback shim")
        build_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [compiler, "-shared", "-fPIC", "-O2", "-o", str(target), str(SHIM_SOURCE), "-ldl"],
            check=True, capture_output=True,
        )
    return {"LD_PRELOAD": str(target)}


@dataclass
class Server:
    """A started server process, its log file and how to tell it is alive."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def check_alive(self) -> None:
        code = self.process.poll()
        if code is not None:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
            last = lines[-1][:500] if lines else "(empty log)"
            raise BenchError(f"{self.name} exited with status {code}; last log line: {last}")

    def wait_listening(self, port: int, timeout: float = 60) -> None:
        def ready() -> bool:
            self.check_alive()
            return listening(port)

        wait_until(ready, timeout, f"{self.name} to listen on port {port}")

    def peak_rss(self) -> tuple[int, int]:
        """VmHWM in bytes of the main process and summed over its process tree."""
        pids = process_tree(self.process.pid)
        main = vm_hwm(self.process.pid)
        return main, sum(vm_hwm(pid) for pid in pids)

    def stop(self, timeout: float = 60) -> None:
        stop_group(self.process, timeout)


def start_server(
    name: str, args: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Server:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            list(args), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None, cwd=cwd, start_new_session=True,
        )
    return Server(name, process, log_path)


def stop_group(process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """SIGTERM the process group, wait up to *timeout* s, then SIGKILL it."""
    if process.poll() is None:
        _signal_group(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=timeout)
    # Children left in the group (forked workers) go too.
    _signal_group(process.pid, signal.SIGKILL)
    if process.poll() is None:
        process.wait(timeout=30)


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def process_tree(root: int) -> list[int]:
    """*root* and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may contain spaces: the fields after the last ')' are fixed.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def vm_hwm(pid: int) -> int:
    """Peak resident set size (VmHWM) of *pid* in bytes; 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return 0
    return 0


class Senders:
    """Sender processes launched together; the clock starts just before the first launch.

    Use as a context manager: whatever happens, every sender is stopped on exit.
    """

    def __init__(self, commands: Sequence[Sequence[str]], log_dir: Path,
                 env: Mapping[str, str]) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = log_dir
        self._logs = [(log_dir / f"sender-{index}.log").open("wb")
                      for index in range(len(commands))]
        self.processes: list[subprocess.Popen[bytes]] = []
        self.end: float | None = None
        self.start = time.perf_counter()
        for command, log in zip(commands, self._logs, strict=True):
            self.processes.append(subprocess.Popen(
                list(command), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=dict(env), start_new_session=True,
            ))

    def __enter__(self) -> Senders:
        return self

    def __exit__(self, *_exc: object) -> None:
        for process in self.processes:
            stop_group(process, timeout=5)
        for log in self._logs:
            log.close()

    def poll(self) -> bool:
        """True once every sender has exited (the first time: the end of the clock)."""
        if self.end is None and all(p.poll() is not None for p in self.processes):
            self.end = time.perf_counter()
            self._check()
        return self.end is not None

    def wait(self, timeout: float) -> float:
        """Wait for every sender; the seconds from launch to the last exit."""
        deadline = self.start + timeout
        for process in self.processes:
            try:
                process.wait(timeout=max(0.0, deadline - time.perf_counter()))
            except subprocess.TimeoutExpired:
                raise BenchError(f"sender still running after {timeout:.0f}s") from None
        self.poll()
        assert self.end is not None
        return self.end - self.start

    def _check(self) -> None:
        failed = [(index, p.returncode) for index, p in enumerate(self.processes) if p.returncode]
        if failed:
            for log in self._logs:
                log.flush()
            first = self.log_dir / f"sender-{failed[0][0]}.log"
            said = " ".join(first.read_text(errors="replace").split("\n")[:3]).strip()
            raise BenchError(f"sender(s) failed (index, exit status): {failed}; "
                             f"sender-{failed[0][0]}.log: {said}")
