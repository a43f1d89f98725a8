"""The node's background work: uploads, forwarding, study events.

Everything here is driven by the index (the outbox): the receive path only commits rows
and wakes these workers. :class:`Background` runs them as threads of the process it is
in; :mod:`gateway.worker_process` runs one in a process of its own, so they use another
CPU core instead of competing with receiving for the interpreter.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol
from zoneinfo import ZoneInfo

from sqlalchemy import Engine

from gateway.config import EventSinkConfig, GatewayConfig, Hl7DestinationConfig
from gateway.events.builder import EventTargets
from gateway.events.dispatcher import EventDispatcher, SinkWorker
from gateway.events.fhir import FhirOptions
from gateway.events.sinks import MllpSink, open_sink
from gateway.events.watcher import StudyWatcher
from gateway.forwarder import Forwarder, ForwardSettings
from gateway.logs import failure_fields, get_logger
from gateway.metrics import Metrics
from gateway.objectstore import ObjectStore
from gateway.spool import Spool
from gateway.uploader import Uploader

log = get_logger(__name__)

# Operators' pause/resume decisions made on another node reach this one this often.
PAUSE_REFRESH_SECONDS = 10.0


class BackgroundWork(Protocol):
    """What the node asks of its background work, wherever it runs."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def wake_upload(self) -> None: ...

    def wake_forward(self, destinations: Iterable[str]) -> None: ...

    def association_ended(self, destinations: Iterable[str]) -> None:
        """An association whose instances were routed to *destinations* has ended: what
        it brought is all in the index, so forwarding need not wait for more of it."""

    def refresh_paused(self) -> None: ...

    def reconfigure(self, config: GatewayConfig) -> None:
        """Apply a reloaded configuration; raise (and change nothing) when it cannot."""

    def problems(self) -> list[str]:
        """Why the background work cannot run now; empty when it can."""


def _local_zone() -> dt.tzinfo:
    return dt.datetime.now().astimezone().tzinfo or dt.UTC


def event_targets(config: GatewayConfig) -> EventTargets:
    """Where study events go and how they are built."""
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


def _sink_configs(config: GatewayConfig) -> dict[str, EventSinkConfig | Hl7DestinationConfig]:
    entries: list[EventSinkConfig | Hl7DestinationConfig] = [
        *config.event_sink, *config.hl7_destination
    ]
    return {entry.name: entry for entry in entries}


class Background:
    """Uploader, forwarder, study watcher and event dispatcher as threads of this process."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        engine: Engine,
        spool: Spool,
        store: ObjectStore,
        node_name: str,
        metrics: Metrics,
    ) -> None:
        self.config = config
        self.engine = engine
        self.spool = spool
        self.node_name = node_name
        self.metrics = metrics
        self.uploader = Uploader(
            engine, spool, store, node_name,
            workers=config.storage.upload_workers,
            retry=config.storage.upload_retry,
            yield_seconds=config.storage.upload_yield_seconds,
            metrics=metrics,
        )
        self.forwarder = Forwarder(
            list(config.destination),
            ForwardSettings(
                engine=engine,
                spool=spool,
                store=store,
                node_name=node_name,
                calling_ae_title=config.node.ae_title,
                metrics=metrics,
            ),
        )
        workers = self._sink_workers(config, set(_sink_configs(config)))
        self.dispatcher = EventDispatcher(workers, engine, node_name)
        self.watcher = StudyWatcher(
            engine, event_targets(config),
            stable_seconds=config.events.stable_seconds,
            check_seconds=config.events.check_seconds, on_events=self.dispatcher.wake,
            metrics=metrics,
        )
        self._stopping = threading.Event()
        self._pause_refresher = threading.Thread(
            target=self._refresh_pauses, name="pause-refresh", daemon=True
        )

    def _sink_workers(self, config: GatewayConfig, names: set[str]) -> list[SinkWorker]:
        """Workers for the event sinks and HL7 destinations named in *names*."""
        return [
            SinkWorker(open_sink(sink), sink.retry, self.engine, self.node_name,
                       metrics=self.metrics)
            for sink in config.event_sink if sink.name in names
        ] + [
            SinkWorker(MllpSink(target, config.hl7.max_message_bytes), target.retry,
                       self.engine, self.node_name, metrics=self.metrics)
            for target in config.hl7_destination if target.name in names
        ]

    def start(self) -> None:
        # Copies made for forwarding by a worker that was killed (they hold PHI).
        self.spool.clear_outgoing()
        self.uploader.start()
        self.forwarder.start()
        self.dispatcher.start()
        self.watcher.start()
        self._pause_refresher.start()

    def stop(self) -> None:
        self._stopping.set()
        self.watcher.stop()
        self.dispatcher.stop()
        self.forwarder.stop()
        self.uploader.stop()

    def wake_upload(self) -> None:
        self.uploader.wake()

    def wake_forward(self, destinations: Iterable[str]) -> None:
        self.forwarder.wake(set(destinations))

    def association_ended(self, destinations: Iterable[str]) -> None:
        self.forwarder.settle(set(destinations))

    def refresh_paused(self) -> None:
        self.forwarder.refresh_paused()

    def problems(self) -> list[str]:
        return []

    def _refresh_pauses(self) -> None:
        while not self._stopping.wait(PAUSE_REFRESH_SECONDS):
            try:
                self.forwarder.refresh_paused()
            except Exception as exc:  # noqa: BLE001 - tried again next round
                log.error("pause_refresh_failed", **failure_fields(exc))

    def reconfigure(self, config: GatewayConfig) -> None:
        old = self.config
        # Build first: a failure leaves the running configuration untouched.
        targets = event_targets(config)
        old_sinks, new_sinks = _sink_configs(old), _sink_configs(config)
        leaving = {name for name, entry in old_sinks.items() if new_sinks.get(name) != entry}
        starting = {name for name, entry in new_sinks.items() if old_sinks.get(name) != entry}
        sink_workers = self._sink_workers(config, starting)
        self.forwarder.reconfigure(list(config.destination))
        self.dispatcher.reconfigure(leaving, sink_workers)
        self.watcher.reconfigure(targets, config.events.stable_seconds,
                                 config.events.check_seconds)
        self.config = config
        if leaving or starting:
            log.info("event_sinks_reconfigured", sinks_changed=sorted(leaving | starting))
