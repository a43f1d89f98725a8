"""The running node: wires configuration, index, spool, object store, uploader and listener.

Start-up recovery runs before the listener opens, so every instance acknowledged by a
previous run is accounted for before new ones arrive.
"""

from __future__ import annotations

import datetime as dt
import signal
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from gateway import systemd
from gateway.acceptance import AcceptancePolicy
from gateway.config import GatewayConfig
from gateway.events.builder import EventTargets
from gateway.events.dispatcher import EventDispatcher, SinkWorker
from gateway.events.fhir import FhirOptions
from gateway.events.sinks import MllpSink, open_sink
from gateway.events.watcher import StudyWatcher
from gateway.forwarder import Forwarder, ForwardSettings
from gateway.hl7.listener import Hl7Listener, Hl7Processor
from gateway.index import repository
from gateway.index.database import describe_error, make_engine, migrate
from gateway.ingest import Ingestor
from gateway.logs import failure_fields, get_logger
from gateway.objectstore import ObjectStore, ObjectStoreError, open_object_store
from gateway.receiver import Receiver
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


def _local_zone() -> dt.tzinfo:
    return dt.datetime.now().astimezone().tzinfo or dt.UTC


class StartupError(Exception):
    """The node cannot start; the message says what to fix."""


class Node:
    """One gateway process."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
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
        self.uploader = Uploader(
            self.engine,
            self.spool,
            self.store,
            self.name,
            workers=config.storage.upload_workers,
            retry=config.storage.upload_retry,
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
            ),
        )
        self.dispatcher, self.watcher = self._events(config)
        self.hl7_listener: Hl7Listener | None = None
        if config.hl7.listen_port is not None:
            self.hl7_listener = Hl7Listener(Hl7Processor(self.engine, config.hl7), config.hl7)
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
        self.receiver = Receiver(config.node, policy, self.ingestor, self.engine, self.name)
        self._stop_requested = threading.Event()
        self._stopped = False
        self._maintenance = threading.Thread(target=self._maintain, name="maintenance", daemon=True)

    def _events(self, config: GatewayConfig) -> tuple[EventDispatcher, StudyWatcher]:
        events = config.events
        zone = ZoneInfo(events.timezone) if events.timezone else _local_zone()
        store_url = config.storage.object_store
        if store_url.startswith("file://"):
            store_url = "file://" + str(Path(store_url.removeprefix("file://")).resolve())
        targets = EventTargets(
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
        workers = [
            SinkWorker(open_sink(sink), sink.retry, self.engine, self.name)
            for sink in config.event_sink
        ] + [
            SinkWorker(MllpSink(target, config.hl7.max_message_bytes), target.retry,
                       self.engine, self.name)
            for target in config.hl7_destination
        ]
        dispatcher = EventDispatcher(workers, self.engine, self.name)
        watcher = StudyWatcher(
            self.engine, targets, stable_seconds=events.stable_seconds,
            check_seconds=events.check_seconds, on_events=dispatcher.wake,
        )
        return dispatcher, watcher

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
        for address, start in listeners:
            try:
                start()
            except OSError as exc:
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

    def run(self) -> None:
        """Run in the foreground until SIGTERM or SIGINT."""
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        try:
            self.start()
        except StartupError:
            self.engine.dispose()
            raise
        try:
            while not self._stop_requested.wait(1.0):
                pass
        finally:
            self.stop()
