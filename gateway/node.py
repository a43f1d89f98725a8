"""The running node: wires configuration, index, spool, object store, listener and the
background work (uploads, forwarding, events; in a worker process by default).

Start-up recovery runs before the background work starts and the listener opens, so
every instance acknowledged by a previous run is accounted for before new ones arrive.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import threading
import time
from collections.abc import Collection, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError

from gateway import systemd
from gateway.acceptance import AcceptancePolicy
from gateway.background import Background, BackgroundWork
from gateway.config import ConfigError, GatewayConfig, load_config
from gateway.events.dispatcher import EventDispatcher
from gateway.events.watcher import StudyWatcher
from gateway.forwarder import Forwarder
from gateway.hl7.listener import Hl7Listener, Hl7Processor
from gateway.http.api import build_router
from gateway.http.server import AdminServer
from gateway.index import admin, repository
from gateway.index.database import describe_error, make_engine, migrate, reading
from gateway.ingest import Ingestor
from gateway.logs import failure_fields, get_logger
from gateway.metrics import Metrics
from gateway.objectstore import ObjectStore, ObjectStoreError, open_object_store
from gateway.receiver import Receiver
from gateway.reload import ReloadOutcome, plan_reload
from gateway.routing import compile_rules, header_tags, make_router
from gateway.spool import Spool, SpoolError, SpoolInUseError
from gateway.uploader import Uploader
from gateway.worker_process import WorkerProcess, WorkerStartError

log = get_logger(__name__)


# Unreferenced spool files are kept this long before they are deleted.
ORPHAN_RETENTION_SECONDS = 7 * 24 * 3600
MAINTENANCE_SECONDS = 10.0
INCOMING_SWEEP_SECONDS = 300.0
# A partial reception idle this long belongs to no live association.
INCOMING_STALE_SECONDS = 3600.0
# /readyz probes the object store at most this often.
STORE_CHECK_SECONDS = 5.0


class StartupError(Exception):
    """The node cannot start; the message says what to fix."""




class Node:
    """One gateway process."""

    def __init__(self, config: GatewayConfig, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.metrics = Metrics()
        self.started_at = time.monotonic()
        self.spool = Spool(config.storage.spool_dir, config.storage.min_free_bytes)
        try:
            self.spool.lock()
            self.name = self.spool.identity()
        except (SpoolInUseError, SpoolError) as exc:
            self.spool.close()
            raise StartupError(str(exc)) from exc
        self.engine: Engine = make_engine(
            config.storage.database, timeout=config.storage.database_timeout
        )
        self.store: ObjectStore = open_object_store(config.storage)
        self.metrics.watch_index(self.engine)
        self.work: BackgroundWork
        if config.node.worker_process:
            self.work = WorkerProcess(config, node_name=self.name,
                                      spool_lock_fd=self.spool.lock_fd, metrics=self.metrics)
        else:
            self.work = Background(config, engine=self.engine, spool=self.spool,
                                   store=self.store, node_name=self.name, metrics=self.metrics)
        rules = compile_rules(config.route)
        self.hl7_listener: Hl7Listener | None = None
        if config.hl7.listen_port is not None:
            self.hl7_listener = Hl7Listener(
                Hl7Processor(self.engine, config.hl7, metrics=self.metrics), config.hl7
            )
        self.ingestor = Ingestor(
            self.engine,
            self.spool,
            self.name,
            router=make_router(rules),
            extra_tags=header_tags(rules),
            on_stored=self._on_stored,
            on_batch=self.metrics.commit_batch.observe,
            in_index_max_bytes=config.storage.spool_in_index_max_bytes,
        )
        policy = AcceptancePolicy.build(
            config.node.ae_title, config.node.accept_unknown_calling_ae, config.calling_ae
        )
        self.receiver = Receiver(config.node, policy, self.ingestor, self.engine, self.name,
                                 metrics=self.metrics, on_ended=self._on_association_ended)
        self.admin_server: AdminServer | None = None
        if config.http.port is not None:
            router = build_router(self, public=config.http.public)
            self.admin_server = AdminServer(config.http, router, self.metrics)
        self._store_problem: tuple[float, str | None] = (-STORE_CHECK_SECONDS, None)
        self._reload_lock = threading.Lock()
        self._reload_requested = threading.Event()
        self._stop_requested = threading.Event()
        self._stopped = False
        self._maintenance = threading.Thread(target=self._maintain, name="maintenance", daemon=True)

    def _in_process(self) -> Background:
        if not isinstance(self.work, Background):
            raise AttributeError("the background work runs in the worker process")  # noqa: TRY004 - absent attribute
        return self.work

    # In-process background components, for tests and tools that drive them directly.
    @property
    def uploader(self) -> Uploader:
        return self._in_process().uploader

    @property
    def forwarder(self) -> Forwarder:
        return self._in_process().forwarder

    @property
    def dispatcher(self) -> EventDispatcher:
        return self._in_process().dispatcher

    @property
    def watcher(self) -> StudyWatcher:
        return self._in_process().watcher

    def _on_stored(self, destinations: Mapping[str, str]) -> None:
        self.work.wake_upload()
        if destinations:
            self.work.wake_forward(destinations)

    def _on_association_ended(self, destinations: Collection[str]) -> None:
        self.work.association_ended(destinations)

    def start(self) -> None:
        """Migrate, recover, then start uploading, forwarding and listening."""
        try:
            migrate(self.engine)
        except SQLAlchemyError as exc:
            raise StartupError(f"index database unavailable: {describe_error(exc)}") from exc
        try:
            self.store.check()
        except ObjectStoreError as exc:
            log.warning("object_store_unavailable_at_start", error=str(exc))
        self.recover()
        try:
            self.work.start()
        except WorkerStartError as exc:
            raise StartupError(str(exc)) from exc
        listeners: list[tuple[str, Any]] = [
            (f"{self.config.node.host}:{self.config.node.port}", self.receiver.start)
        ]
        if self.hl7_listener is not None:
            hl7 = self.config.hl7
            listeners.append((f"{hl7.host}:{hl7.listen_port} (HL7)", self.hl7_listener.start))
        if self.admin_server is not None:
            http = self.config.http
            listeners.append((f"{http.host}:{http.port} (HTTP)", self.admin_server.start))
        for address, start in listeners:
            try:
                start()
            except OSError as exc:
                if self.hl7_listener is not None:
                    self.hl7_listener.stop()
                self.receiver.stop(0)
                self.work.stop()
                raise StartupError(f"cannot listen on {address}: {exc.strerror}") from exc
        self._maintenance.start()
        systemd.notify("READY=1")
        log.info("node_started", node=self.name, store=self.store.description)

    def _maintain(self) -> None:
        """Periodic housekeeping while the node runs."""
        last_sweep = time.monotonic()
        while not self._stop_requested.wait(MAINTENANCE_SECONDS):
            try:
                reaped = self.receiver.reap()
                if reaped:
                    log.warning("associations_reaped", count=reaped)
                if time.monotonic() - last_sweep > INCOMING_SWEEP_SECONDS:
                    last_sweep = time.monotonic()
                    removed = self.spool.clear_incoming(older_than=INCOMING_STALE_SECONDS)
                    removed += self.spool.sweep_orphaned(ORPHAN_RETENTION_SECONDS)
                    if removed:
                        log.info("spool_swept", removed=removed)
            except Exception as exc:  # noqa: BLE001 - housekeeping retries next round
                log.error("maintenance_failed", **failure_fields(exc))

    def recover(self) -> None:
        """Account for a previous run that stopped abruptly (kill -9, power loss)."""
        partial = self.spool.clear_incoming()
        self.spool.clear_outgoing()
        now = dt.datetime.now(dt.UTC)
        with self.engine.begin() as connection:
            interrupted = repository.mark_interrupted_associations(connection, self.name, now)
            referenced = repository.spooled_names(connection, self.name)
            backlog = repository.spool_backlog(connection, self.name)
        on_disk = self.spool.ready_names()
        # In ready/ but not in the index: normally a commit that never happened (so never
        # acknowledged; the sender sends it again, and the file may be incomplete: it is
        # renamed into ready/ before it is flushed), but also what a database restored
        # from an older backup looks like. Kept aside, never deleted here.
        orphans = on_disk - referenced
        for name in orphans:
            self.spool.quarantine(name)
        if orphans:
            log.warning("spool_files_unreferenced", count=len(orphans),
                        moved_to=str(self.spool.orphaned),
                        note="never acknowledged (possibly incomplete) or a restored "
                             "database's: check a file before using it")
        swept = self.spool.sweep_orphaned(ORPHAN_RETENTION_SECONDS)
        missing = referenced - on_disk
        if missing:
            log.critical("spool_files_missing", count=len(missing))
        log.info(
            "recovery_done",
            partial_receptions_removed=partial,
            unreferenced_spool_files_quarantined=len(orphans),
            quarantined_files_expired=swept,
            interrupted_associations=interrupted,
            pending_uploads=backlog,
        )

    def stop(self) -> None:
        """Graceful stop: no new associations, in-flight ones finish, uploads finish."""
        if self._stopped:
            return
        self._stopped = True
        self._stop_requested.set()
        systemd.notify("STOPPING=1")
        log.info("node_stopping")
        if self.hl7_listener is not None:
            self.hl7_listener.stop()
        if self.admin_server is not None:
            self.admin_server.stop()
        self.receiver.stop(self.config.node.stop_timeout)
        self.ingestor.close()
        self.work.stop()
        self.engine.dispose()
        self.spool.close()
        log.info("node_stopped")

    def request_stop(self, signum: int | None = None, _frame: FrameType | None = None) -> None:
        if signum is not None:
            log.info("signal_received", signal=signal.Signals(signum).name)
        self._stop_requested.set()

    def _request_reload(self, signum: int, _frame: FrameType | None) -> None:
        self._reload_requested.set()

    def run(self) -> None:
        """Run in the foreground until SIGTERM or SIGINT; SIGHUP reloads the config."""
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGHUP, self._request_reload)
        try:
            self.start()
        except StartupError:
            self.engine.dispose()
            raise
        try:
            while not self._stop_requested.wait(0.25):
                if self._reload_requested.is_set():
                    self._reload_requested.clear()
                    log.info("signal_received", signal="SIGHUP")
                    self.reload()
        finally:
            self.stop()

    # --- what the admin API asks of the node -------------------------------------------

    def uptime_seconds(self) -> float:
        return time.monotonic() - self.started_at

    def destination_names(self) -> list[str]:
        return [entry.name for entry in self.config.destination]

    def set_paused(self, destination: str, paused: bool) -> None:
        """Pause or resume forwarding to *destination* (shared by all nodes)."""
        with self.engine.begin() as connection:
            admin.set_paused(connection, destination, paused, dt.datetime.now(dt.UTC))
        self.work.refresh_paused()

    def readiness(self) -> list[str]:
        """Why the node cannot take work now; empty when it can."""
        problems = []
        try:
            with reading(self.engine) as connection:
                connection.execute(text("SELECT 1"))
        except SQLAlchemyError as exc:
            problems.append(f"index database unavailable: {describe_error(exc)}")
        if not os.access(self.spool.root, os.W_OK):
            problems.append(f"spool directory {self.spool.root} is not writable")
        elif not self.spool.has_room():
            problems.append("spool disk below its free-space threshold")
        checked_at, problem = self._store_problem
        if time.monotonic() - checked_at >= STORE_CHECK_SECONDS:
            try:
                self.store.check()
                problem = None
            except ObjectStoreError as exc:
                problem = f"object store unavailable: {exc}"
            self._store_problem = (time.monotonic(), problem)
        if problem:
            problems.append(problem)
        problems.extend(self.work.problems())
        return problems

    def reload(self) -> ReloadOutcome:
        """Re-read the configuration file and apply what can change while running."""
        with self._reload_lock:
            if self.config_path is None:
                return ReloadOutcome(False, ["the node was not started from a file"])
            systemd.notify("RELOADING=1")
            try:
                new = load_config(self.config_path)
            except ConfigError as exc:
                log.error("config_reload_refused", reason=str(exc))
                return ReloadOutcome(False, [str(exc)])
            finally:
                systemd.notify("READY=1")
            plan = plan_reload(self.config, new)
            try:
                self._apply(plan.effective)
            except Exception as exc:  # noqa: BLE001 - the running configuration stays
                log.error("config_reload_failed", **failure_fields(exc))
                return ReloadOutcome(False, [f"could not apply: {type(exc).__name__}, "
                                             "see the node's log"])
            if plan.restart_required:
                log.warning("config_reload_needs_restart", settings=list(plan.restart_required))
            log.info("config_reloaded", path=str(self.config_path))
            return ReloadOutcome(True, restart_required=list(plan.restart_required))

    def _apply(self, config: GatewayConfig) -> None:
        # Build everything first: a failure leaves the running configuration untouched.
        rules = compile_rules(config.route)
        router = make_router(rules)
        policy = AcceptancePolicy.build(
            config.node.ae_title, config.node.accept_unknown_calling_ae, config.calling_ae
        )
        # Destinations first, so a route to a new destination finds its worker.
        self.work.reconfigure(config)
        self.ingestor.set_routing(router, header_tags(rules))
        self.receiver.policy = policy
        if self.hl7_listener is not None:
            self.hl7_listener.processor.config = config.hl7
        self.config = config
        log.info("config_applied", destinations=len(config.destination),
                 routes=len(config.route), calling_ae_titles=len(config.calling_ae))
