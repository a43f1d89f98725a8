"""The node's background work in a process of its own.

The receive path and the background work (uploads, forwarding, study events) are both
CPU work in Python; in one process they share one interpreter lock, and forwarding a
study slows receiving the next one down. ``dicom-gateway run`` therefore starts a
worker process next to the listener (``[node] worker_process``, on by default). The
index is the only state they share: the listener commits instances and their outbox
rows, the worker claims them, exactly as two nodes sharing a database would.

The listener process supervises the worker: it starts it after start-up recovery,
restarts it when it exits (with a growing delay), stops it last on shutdown, and talks
to it over a socket pair with length-prefixed JSON messages:

- listener to worker: ``init`` (the configuration), ``stored`` (wake-ups after each
  committed instance), ``refresh_paused``, ``reconfigure``, ``metrics``, ``stop``;
- worker to listener: ``ready``, ``failed``, and one reply per request.

The worker dies with the listener (``PR_SET_PDEATHSIG``, and the socket's end of file),
so a kill -9 of the node leaves no worker behind; it holds the spool lock it inherited,
so no other node can start on the spool while it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any

from gateway.config import GatewayConfig
from gateway.logs import failure_fields, get_logger
from gateway.metrics import Metrics, families_as_data

log = get_logger("gateway.worker_process")  # also when run as __main__

_HEADER = struct.Struct(">I")
_MAX_MESSAGE = 64 * 1024 * 1024
START_TIMEOUT_SECONDS = 60.0
REQUEST_TIMEOUT_SECONDS = 60.0
METRICS_TIMEOUT_SECONDS = 5.0
STOP_TIMEOUT_SECONDS = 90.0
RESTART_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)
# A worker that ran this long before exiting starts again after the first delay.
STABLE_SECONDS = 60.0
NOTIFY_INTERVAL_SECONDS = 0.02
"""The shortest time between two wake-up messages to the worker."""
_PR_SET_PDEATHSIG = 1


class WorkerStartError(Exception):
    """The worker process did not start; the message says why."""


class ChannelClosedError(Exception):
    """The other process closed the socket (it exited)."""


def send_message(sock: socket.socket, message: dict[str, Any]) -> None:
    body = json.dumps(message, separators=(",", ":")).encode()
    sock.sendall(_HEADER.pack(len(body)) + body)


def _receive_exactly(sock: socket.socket, size: int, *, patient: bool) -> bytes:
    chunks = []
    while size:
        try:
            chunk = sock.recv(min(size, 1 << 20))
        except TimeoutError:
            if patient:  # the socket's timeout bounds sends; a reader waits on
                continue
            raise
        if not chunk:
            raise ChannelClosedError
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def receive_message(sock: socket.socket, *, patient: bool = False) -> dict[str, Any]:
    """The next message; *patient* waits through the socket's timeout."""
    (size,) = _HEADER.unpack(_receive_exactly(sock, _HEADER.size, patient=patient))
    if size > _MAX_MESSAGE:
        raise ChannelClosedError
    message = json.loads(_receive_exactly(sock, size, patient=patient))
    if not isinstance(message, dict):
        raise ChannelClosedError
    return message


class WorkerProcess:
    """The listener's side: starts, supervises, wakes and stops the worker process.

    Receiving never waits on the worker: wake-ups are merged into one pending set that
    a notifier thread sends, so a worker that is restarting, busy with a reload or hung
    costs the C-STORE path nothing (the work is in the index either way)."""

    def __init__(self, config: GatewayConfig, *, node_name: str, spool_lock_fd: int | None,
                 metrics: Metrics) -> None:
        self.config = config
        self.node_name = node_name
        self.spool_lock_fd = spool_lock_fd
        self._stopping = threading.Event()
        self._lifecycle = threading.Lock()  # starting a worker against stopping
        self._config_lock = threading.Lock()
        self._config_sent: GatewayConfig | None = None
        self._send_lock = threading.Lock()
        self._request_lock = threading.Lock()
        self._reply_ready = threading.Condition()
        self._awaiting: int | None = None
        self._reply: dict[str, Any] | None = None
        self._next_id = 0
        self._socket: socket.socket | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._ready = threading.Event()
        self._start_failure: str | None = None
        self._started = threading.Event()
        self._pending = threading.Condition()
        self._pending_upload = False
        self._pending_destinations: set[str] = set()
        self._pending_refresh = False
        self._pending_ended: set[str] = set()
        self._supervisor = threading.Thread(target=self._supervise, name="worker-supervisor",
                                            daemon=True)
        self._notifier = threading.Thread(target=self._notify_loop, name="worker-notifier",
                                          daemon=True)
        metrics.remote_families = self.metric_families

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker and wait until it runs; raise :class:`WorkerStartError`."""
        self._notifier.start()
        self._supervisor.start()
        self._started.wait(START_TIMEOUT_SECONDS)
        if not self._ready.is_set():
            reason = self._start_failure or "it did not report ready in time"
            self.stop()
            raise WorkerStartError(f"the worker process did not start: {reason}")

    def stop(self) -> None:
        """Let the worker finish what it is doing and exit; kill it if it does not."""
        self._stopping.set()
        with self._pending:
            self._pending.notify_all()
        with self._lifecycle:  # no worker starts after this
            process = self._process
        with contextlib.suppress(OSError, ChannelClosedError):
            self._send({"op": "stop"}, lock_timeout=5.0)
        if process is not None:
            try:
                process.wait(STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                log.error("worker_process_killed", reason="did not stop in time")
                process.kill()
                process.wait()
        for thread in (self._supervisor, self._notifier):
            if thread.is_alive():
                thread.join(10.0)

    def _supervise(self) -> None:
        """Run the worker; start it again whenever it exits until the node stops.

        The worker is started from this thread, which lives as long as the node:
        PR_SET_PDEATHSIG fires when the thread that started the child ends."""
        failures = 0
        while not self._stopping.is_set():
            began = time.monotonic()
            try:
                code = self._run_once()
            except Exception as exc:  # noqa: BLE001 - the supervisor must outlive it
                log.error("worker_supervision_failed", **failure_fields(exc))
                code = None
            if self._stopping.is_set():
                break
            if not self._started.is_set():
                self._started.set()  # start() reports the failure; nothing to restart
                break
            failures = 0 if time.monotonic() - began > STABLE_SECONDS else failures + 1
            delay = RESTART_DELAYS[min(failures, len(RESTART_DELAYS) - 1)]
            log.error("worker_process_exited", exit_code=code, restart_in_seconds=delay)
            if self._stopping.wait(delay):
                break
        self._started.set()

    def _spawn(self) -> tuple[subprocess.Popen[bytes], socket.socket] | None:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pass_fds = [child_end.fileno()]
        if self.spool_lock_fd is not None:
            pass_fds.append(self.spool_lock_fd)
        with self._lifecycle:
            if self._stopping.is_set():
                parent_end.close()
                child_end.close()
                return None
            try:
                process = subprocess.Popen(
                    [sys.executable, "-m", "gateway.worker_process",
                     "--fd", str(child_end.fileno()), "--parent", str(os.getpid())],
                    pass_fds=pass_fds,
                    stdin=subprocess.DEVNULL,
                )
            except OSError as exc:
                parent_end.close()
                self._start_failure = f"cannot run {sys.executable}: {exc.strerror}"
                return None
            finally:
                child_end.close()
            self._process = process
        # A worker that stops reading for this long is hung: the channel is closed,
        # the worker stops and another one starts.
        parent_end.settimeout(REQUEST_TIMEOUT_SECONDS)
        return process, parent_end

    def _run_once(self) -> int | None:
        spawned = self._spawn()
        if spawned is None:
            return None
        process, sock = spawned
        try:
            with self._config_lock:
                self._config_sent = self.config
                init = {"op": "init", "config": self.config.model_dump(mode="json"),
                        "node_name": self.node_name}
            # Sent before anyone else can use the socket: the first message is the init.
            send_message(sock, init)
            with self._send_lock:
                self._socket = sock
            self._read_replies(sock)
        except (OSError, ChannelClosedError, ValueError):
            pass
        finally:
            self._ready.clear()
            with self._send_lock:
                self._socket = None
                sock.close()
            with self._reply_ready:
                self._reply_ready.notify_all()
        code = process.wait()
        if not self._started.is_set() and self._start_failure is None:
            self._start_failure = f"it exited with status {code}"
        return code

    def _read_replies(self, sock: socket.socket) -> None:
        while True:
            message = receive_message(sock, patient=True)
            op = message.get("op")
            if op == "ready":
                self._on_ready()
            elif op == "failed":
                self._start_failure = str(message.get("error"))
            elif op == "reply":
                with self._reply_ready:
                    if message.get("id") == self._awaiting:
                        self._reply = message
                        self._reply_ready.notify_all()

    def _on_ready(self) -> None:
        with self._config_lock:
            self._ready.set()
            newer = self.config if self.config is not self._config_sent else None
        self._started.set()
        log.info("worker_process_started", pid=self.pid)
        if newer is not None:
            # Reloaded while the worker was starting: it applies the newer one now (and
            # logs it if it cannot; the reload itself was already accepted).
            with contextlib.suppress(OSError, ChannelClosedError):
                self._send({"op": "reconfigure", "id": 0,
                            "config": newer.model_dump(mode="json")})

    # --- messages ----------------------------------------------------------------------

    def _send(self, message: dict[str, Any], lock_timeout: float = REQUEST_TIMEOUT_SECONDS,
              ) -> None:
        if not self._send_lock.acquire(timeout=lock_timeout):
            raise ChannelClosedError
        try:
            sock = self._socket
            if sock is None:
                raise ChannelClosedError
            try:
                send_message(sock, message)
            except TimeoutError:
                # Part of a message may be out: the channel cannot be trusted any more.
                log.error("worker_process_unresponsive", reason="not reading its messages")
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                raise ChannelClosedError from None
        finally:
            self._send_lock.release()

    def _request(self, message: dict[str, Any], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        if not self._request_lock.acquire(timeout=timeout):
            raise TimeoutError
        try:
            self._next_id += 1
            with self._reply_ready:
                self._awaiting, self._reply = self._next_id, None
            self._send({**message, "id": self._next_id},
                       lock_timeout=max(0.0, deadline - time.monotonic()))
            with self._reply_ready:
                while self._reply is None:
                    left = deadline - time.monotonic()
                    if self._socket is None:
                        raise ChannelClosedError
                    if left <= 0:
                        raise TimeoutError
                    self._reply_ready.wait(left)
                return self._reply
        finally:
            with self._reply_ready:
                self._awaiting = None
            self._request_lock.release()

    def wake_upload(self) -> None:
        with self._pending:
            self._pending_upload = True
            self._pending.notify()

    def wake_forward(self, destinations: Iterable[str]) -> None:
        with self._pending:
            self._pending_destinations.update(destinations)
            self._pending.notify()

    def association_ended(self, destinations: Iterable[str]) -> None:
        with self._pending:
            self._pending_ended.update(destinations)
            self._pending.notify()

    def refresh_paused(self) -> None:
        with self._pending:
            self._pending_refresh = True
            self._pending.notify()

    def _notify_loop(self) -> None:
        """Send the pending wake-ups, merged, until the node stops.

        After a send, the next waits :data:`NOTIFY_INTERVAL_SECONDS`: while instances
        arrive, one message covers all of them (the worker lets work gather for longer
        than that anyway) instead of one message, and one wake-up of each process, per
        instance."""
        while True:
            with self._pending:
                while not (self._pending_upload or self._pending_destinations
                           or self._pending_refresh or self._pending_ended
                           or self._stopping.is_set()):
                    self._pending.wait()
                if self._stopping.is_set():
                    return
                upload, destinations, refresh, ended = (
                    self._pending_upload, sorted(self._pending_destinations),
                    self._pending_refresh, sorted(self._pending_ended))
                self._pending_upload, self._pending_refresh = False, False
                self._pending_ended.clear()
                self._pending_destinations.clear()
            # A worker that misses a wake-up (it is restarting) finds the work in the
            # index when it starts.
            with contextlib.suppress(OSError, ChannelClosedError):
                if refresh:
                    self._send({"op": "refresh_paused"})
                if upload or destinations:
                    self._send({"op": "stored", "destinations": destinations})
                if ended:
                    self._send({"op": "association_ended", "destinations": ended})
            self._stopping.wait(NOTIFY_INTERVAL_SECONDS)

    def reconfigure(self, config: GatewayConfig) -> None:
        with self._config_lock:
            if not self._ready.is_set():
                self.config = config  # the worker gets it when it starts or is ready
                return
        try:
            reply = self._request({"op": "reconfigure", "config": config.model_dump(mode="json")},
                                  REQUEST_TIMEOUT_SECONDS)
        except TimeoutError:
            raise RuntimeError("the worker process did not confirm it in time") from None
        except (OSError, ChannelClosedError):
            self.config = config  # the worker is gone; the next one starts with it
            return
        if not reply.get("ok"):
            raise RuntimeError(f"the worker process refused it: {reply.get('error')}")
        self.config = config

    def metric_families(self) -> list[dict[str, Any]]:
        if not self._ready.is_set():
            return []
        try:
            families = self._request({"op": "metrics"}, METRICS_TIMEOUT_SECONDS).get("families")
        except (OSError, ChannelClosedError):
            return []
        return families if isinstance(families, list) else []

    def problems(self) -> list[str]:
        if self._ready.is_set():
            return []
        return ["the worker process (uploads, forwarding, events) is not running"]

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None and process.poll() is None else None


# --- the worker's side -----------------------------------------------------------------


def _die_with_parent(parent: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # the socket's end of file stops the worker too
    if os.getppid() != parent:
        os._exit(1)


class _Worker:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.stop_requested = threading.Event()
        self._send_lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        with self._send_lock:
            send_message(self.sock, message)

    def run(self) -> int:
        from gateway.logs import configure_logging

        init = receive_message(self.sock)
        config = GatewayConfig.model_validate(init["config"])
        configure_logging(config.logging, process="worker")
        # The listener decides when the worker stops (after the associations in flight),
        # also when a signal reaches the whole process group (Ctrl-C, a group kill).
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        try:
            background, close = self._build(config, str(init["node_name"]))
            background.start()
        except Exception as exc:  # noqa: BLE001 - reported to the listener, which stops
            fields = failure_fields(exc)
            log.critical("worker_process_failed", **fields)
            with contextlib.suppress(OSError):
                self.send({"op": "failed",
                           "error": f"{fields['error_type']} at {fields['where']}"})
            return 1
        self.send({"op": "ready"})
        reader = threading.Thread(target=self._read, args=(background,), name="worker-channel",
                                  daemon=True)
        reader.start()
        self.stop_requested.wait()
        background.stop()
        close()
        log.info("worker_process_stopped")
        return 0

    @staticmethod
    def _build(config: GatewayConfig, node_name: str) -> tuple[Any, Any]:
        from gateway.background import Background
        from gateway.index.database import make_engine
        from gateway.objectstore import open_object_store
        from gateway.spool import Spool

        spool = Spool(config.storage.spool_dir, config.storage.min_free_bytes)
        engine = make_engine(config.storage.database, timeout=config.storage.database_timeout)
        background = Background(
            config, engine=engine, spool=spool, store=open_object_store(config.storage),
            node_name=node_name, metrics=Metrics(),
        )

        def close() -> None:
            engine.dispose()
            spool.close()

        return background, close

    def _read(self, background: Any) -> None:
        while not self.stop_requested.is_set():
            try:
                message = receive_message(self.sock)
            except (OSError, ChannelClosedError, ValueError):
                break  # the listener is gone: stop
            try:
                self._handle(background, message)
            except (OSError, ChannelClosedError):
                break
            except Exception as exc:  # noqa: BLE001 - one failed message, not the channel
                log.error("worker_message_failed", op=str(message.get("op")),
                          **failure_fields(exc))
        self.stop_requested.set()

    def _handle(self, background: Any, message: dict[str, Any]) -> None:
        op = message.get("op")
        if op == "stored":
            background.wake_upload()
            if message.get("destinations"):
                background.wake_forward(message["destinations"])
        elif op == "association_ended":
            background.association_ended(message.get("destinations") or [])
        elif op == "refresh_paused":
            background.refresh_paused()
        elif op == "reconfigure":
            try:
                background.reconfigure(GatewayConfig.model_validate(message["config"]))
                reply: dict[str, Any] = {"ok": True}
            except Exception as exc:  # noqa: BLE001 - reported to the listener, which logs it
                log.error("config_reload_failed", **failure_fields(exc))
                reply = {"ok": False, "error": type(exc).__name__}
            self.send({"op": "reply", "id": message["id"], **reply})
        elif op == "metrics":
            families = families_as_data(background.metrics.registry)
            self.send({"op": "reply", "id": message["id"], "families": families})
        elif op == "stop":
            self.stop_requested.set()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.worker_process")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    args = parser.parse_args(argv)
    _die_with_parent(args.parent)
    sock = socket.socket(fileno=args.fd)
    try:
        return _Worker(sock).run()
    except (OSError, ChannelClosedError):
        return 1


if __name__ == "__main__":
    sys.exit(main())
