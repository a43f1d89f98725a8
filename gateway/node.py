"""The running node: wires configuration, index, spool, object store, uploader and listener.

Start-up recovery runs before the listener opens, so every instance acknowledged by a
previous run is accounted for before new ones arrive.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError

from gateway import systemd
from gateway.acceptance import AcceptancePolicy
from gateway.config import (
    ConfigError,
    EventSinkConfig,
    GatewayConfig,
    Hl7DestinationConfig,
    load_config,
)
from gateway.events.builder import EventTargets
from gateway.events.dispatcher import EventDispatcher, SinkWorker
from gateway.events.fhir import FhirOptions
from gateway.events.sinks import MllpSink, open_sink
from gateway.events.watcher import StudyWatcher
from gateway.forwarder import Forwarder, ForwardSettings
from gateway.hl7.listener import Hl7Listener, Hl7Processor
from gateway.http.api import build_router
from gateway.http.server import AdminServer
from gateway.index import admin, repository
from gateway.index.database import describe_error, make_engine, migrate
from gateway.ingest import Ingestor
from gateway.logs import failure_fields, get_logger
from gateway.metrics import Metrics
from gateway.objectstore import ObjectStore, ObjectStoreError, open_object_store
from gateway.receiver import Receiver
from gateway.reload import ReloadOutcome, plan_reload
from gateway.routing import compile_rules, header_tags, make_router
from gateway.spool import Spool, SpoolError, SpoolInUseError
from gateway.uploader import Uploader

log = get_logger(__name__)


# Unreferenced spool files are kept this long before they are deleted.
ORPHAN_RETENTION_SECONDS = 7 * 24 * 3600
MAINTENANCE_SECONDS = 10.0
INCOMING_SWEEP_SECONDS = 300.0
# A partial reception idle this long belongs to no live association.
INCOMING_STALE_SECONDS = 3600.0
# /readyz probes the object store at most this often.
STORE_CHECK_SECONDS = 5.0


def _local_zone() -> dt.tzinfo:
    return dt.datetime.now().astimezone().tzinfo or dt.UTC


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
        self.uploader = Uploader(
            self.engine,
            self.spool,
            self.store,
            self.name,
            workers=config.storage.upload_workers,
            retry=config.storage.upload_retry,
            metrics=self.metrics,
        )
        rules = compile_rules(config.route)
        self.forwarder = Forwarder(
            list(config.destination),
            ForwardSettings(
                engine=self.engine,
                spool=self.spool,
                store=self.store,
                node_name=self.name,
                calling_ae_title=config.node.ae_title,
                metrics=self.metrics,
            ),
        )
        self.dispatcher, self.watcher = self._events(config)
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
        )
        policy = AcceptancePolicy.build(
            config.node.ae_title, config.node.accept_unknown_calling_ae, config.calling_ae
        )
        self.receiver = Receiver(config.node, policy, self.ingestor, self.engine, self.name,
                                 metrics=self.metrics)
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

    def _events(self, config: GatewayConfig) -> tuple[EventDispatcher, StudyWatcher]:
        workers = self._sink_workers(config, set(self._sink_configs(config)))
        dispatcher = EventDispatcher(workers, self.engine, self.name)
        watcher = StudyWatcher(
            self.engine, self._event_targets(config),
            stable_seconds=config.events.stable_seconds,
            check_seconds=config.events.check_seconds, on_events=dispatcher.wake,
            metrics=self.metrics,
        )
        return dispatcher, watcher

    @staticmethod
    def _sink_configs(
        config: GatewayConfig,
    ) -> dict[str, EventSinkConfig | Hl7DestinationConfig]:
        entries: list[EventSinkConfig | Hl7DestinationConfig] = [
            *config.event_sink, *config.hl7_destination
        ]
        return {entry.name: entry for entry in entries}

    def _sink_workers(self, config: GatewayConfig, names: set[str]) -> list[SinkWorker]:
        """Workers for the event sinks and HL7 destinations named in *names*."""
        return [
            SinkWorker(open_sink(sink), sink.retry, self.engine, self.name,
                       metrics=self.metrics)
            for sink in config.event_sink if sink.name in names
        ] + [
            SinkWorker(MllpSink(target, config.hl7.max_message_bytes), target.retry,
                       self.engine, self.name, metrics=self.metrics)
            for target in config.hl7_destination if target.name in names
        ]

    @staticmethod
    def _event_targets(config: GatewayConfig) -> EventTargets:
        events = config.events
        zone = ZoneInfo(events.timezone) if events.timezone else _local_zone()
        store_url = config.storage.object_store
        if store_url.startswith("file://"):
            store_url = "file://" + str(Path(store_url.removeprefix("file://")).resolve())
        return EventTargets(
            fhir_sinks=config.event_sink,
            hl7_destinations=config.hl7_destination,
            hl7=config.hl7,
            fhir=FhirOptions(
                version=events.fhir_version,
                endpoint_url=events.endpoint_url,
                attachment_base_url=events.retrieval_url or store_url,
                patient_identifier_system=events.patient_identifier_system,
                accession_identifier_system=events.accession_identifier_system,
                timezone=zone,
            ),
        )

    def _on_stored(self, destinations: Mapping[str, str]) -> None:
        self.uploader.wake()
        if destinations:
            self.forwarder.wake(destinations)

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
        self.uploader.start()
        self.forwarder.start()
        self.dispatcher.start()
        self.watcher.start()
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
                self._stop_workers()
                raise StartupError(f"cannot listen on {address}: {exc.strerror}") from exc
        self._maintenance.start()
        systemd.notify("READY=1")
        log.info("node_started", node=self.name, store=self.store.description)

    def _maintain(self) -> None:
        """Periodic housekeeping while the node runs."""
        last_sweep = time.monotonic()
        while not self._stop_requested.wait(MAINTENANCE_SECONDS):
            try:
                self.forwarder.refresh_paused()
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
        on_disk = self.spool.ready_names()
        # In ready/ but not in the index: normally a commit that never happened (so never
        # acknowledged; the sender sends it again), but also what a database restored
        # from an older backup looks like. Kept aside, never deleted here.
        orphans = on_disk - referenced
        for name in orphans:
            self.spool.quarantine(name)
        if orphans:
            log.warning("spool_files_unreferenced", count=len(orphans),
                        moved_to=str(self.spool.orphaned))
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
            pending_uploads=len(referenced),
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
        self._stop_workers()
        self.engine.dispose()
        self.spool.close()
        log.info("node_stopped")

    def _stop_workers(self) -> None:
        self.watcher.stop()
        self.dispatcher.stop()
        self.forwarder.stop()
        self.uploader.stop()

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
        self.forwarder.refresh_paused()

    def readiness(self) -> list[str]:
        """Why the node cannot take work now; empty when it can."""
        problems = []
        try:
            with self.engine.connect() as connection:
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
        old = self.config
        # Build everything first: a failure leaves the running configuration untouched.
        rules = compile_rules(config.route)
        router = make_router(rules)
        policy = AcceptancePolicy.build(
            config.node.ae_title, config.node.accept_unknown_calling_ae, config.calling_ae
        )
        targets = self._event_targets(config)
        old_sinks, new_sinks = self._sink_configs(old), self._sink_configs(config)
        leaving = {name for name, entry in old_sinks.items() if new_sinks.get(name) != entry}
        starting = {name for name, entry in new_sinks.items() if old_sinks.get(name) != entry}
        sink_workers = self._sink_workers(config, starting)
        # Destinations first, so a route to a new destination finds its worker.
        self.forwarder.reconfigure(list(config.destination))
        self.ingestor.set_routing(router, header_tags(rules))
        self.receiver.policy = policy
        self.dispatcher.reconfigure(leaving, sink_workers)
        self.watcher.reconfigure(targets, config.events.stable_seconds,
                                 config.events.check_seconds)
        if self.hl7_listener is not None:
            self.hl7_listener.processor.config = config.hl7
        self.config = config
        log.info("config_applied", destinations=len(config.destination),
                 routes=len(config.route), calling_ae_titles=len(config.calling_ae),
                 sinks_changed=sorted(leaving | starting))
