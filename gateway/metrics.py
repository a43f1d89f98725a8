"""Prometheus metrics, all named ``dicom_gateway_*``.

Counters and histograms are updated where things happen; backlog gauges (spool, queues,
event deliveries, unrouted, dead letters) are read from the index when Prometheus
scrapes, so every node reports the shared queues as they are. Each node has its own
registry (several nodes can run in one process, as in the tests). A node whose
background work runs in a worker process merges that process's counters into its own
output at scrape time (:meth:`Metrics.exposition`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    Metric,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import SQLAlchemyError

PREFIX = "dicom_gateway"

# The *_created series double every counter's output for no use on a dashboard.
disable_created_metrics()  # type: ignore[no-untyped-call]


class Metrics:
    """The node's metrics; components get it at construction."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # The worker process's metric families (see families_as_data), when there is one.
        self.remote_families: Callable[[], list[dict[str, Any]]] | None = None
        r = self.registry
        self.associations = Counter(
            f"{PREFIX}_associations", "Inbound associations by calling AE title and outcome",
            ["calling_ae", "outcome"], registry=r)
        self.instances = Counter(
            f"{PREFIX}_instances_received", "Instances received, by calling AE and outcome "
            "(stored, duplicate, new_version, refused)", ["calling_ae", "outcome"], registry=r)
        self.bytes = Counter(
            f"{PREFIX}_bytes_received", "Bytes of instances received", registry=r)
        self.store_seconds = Histogram(
            f"{PREFIX}_store_seconds", "Time from a complete C-STORE data set to its response "
            "(read header, fsync, commit)",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r)
        self.commit_batch = Histogram(
            f"{PREFIX}_index_commit_batch_size", "Instances acknowledged per index commit "
            "(associations storing at the same moment share one commit)",
            buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.uploads = Counter(
            f"{PREFIX}_uploads", "Uploads to the object store by outcome", ["outcome"],
            registry=r)
        self.forwards = Counter(
            f"{PREFIX}_forward_outcomes", "C-STORE forward outcomes by destination and status "
            "class (success, warning, transient, permanent)", ["destination", "status_class"],
            registry=r)
        self.dead_letters = Counter(
            f"{PREFIX}_dead_letters", "Forward jobs and event deliveries that became dead "
            "letters", ["kind", "target"], registry=r)
        self.event_deliveries = Counter(
            f"{PREFIX}_event_deliveries", "Event deliveries by sink and outcome",
            ["sink", "outcome"], registry=r)
        self.study_events = Counter(
            f"{PREFIX}_study_events", "Study events raised", registry=r)
        self.hl7_messages = Counter(
            f"{PREFIX}_hl7_messages", "Inbound HL7 messages by type and ACK code",
            ["message_type", "ack"], registry=r)
        self.demographics_mismatches = Counter(
            f"{PREFIX}_order_demographics_mismatches",
            "Studies whose patient demographics differ from their order", registry=r)

    def exposition(self) -> bytes:
        """The Prometheus text output: this process's metrics plus the worker's."""
        if self.remote_families is None:
            return generate_latest(self.registry)
        merged = CollectorRegistry(auto_describe=False)
        merged.register(_Merged(
            [*families_as_data(self.registry), *self.remote_families()]
        ))
        return generate_latest(merged)

    def watch_index(self, engine: Engine) -> None:
        """Report the index's backlogs at scrape time."""
        self.registry.register(_IndexCollector(engine))


def families_as_data(registry: CollectorRegistry) -> list[dict[str, Any]]:
    """*registry*'s current metric families as plain data (to send between processes)."""
    return [
        {"name": family.name, "documentation": family.documentation, "type": family.type,
         "unit": family.unit,
         "samples": [[sample.name, sample.labels, sample.value] for sample in family.samples]}
        for family in registry.collect()
    ]


class _Merged(Collector):
    """Families from several processes: samples with the same name and labels are
    summed (every family the worker reports is a counter or a histogram)."""

    def __init__(self, families: Iterable[dict[str, Any]]) -> None:
        self.families: dict[str, tuple[dict[str, Any], dict[Any, list[Any]]]] = {}
        for family in families:
            _head, samples = self.families.setdefault(family["name"], (family, {}))
            for name, labels, value in family["samples"]:
                key = (name, tuple(sorted(labels.items())))
                if key in samples:
                    samples[key][2] += value
                else:
                    samples[key] = [name, labels, value]

    def collect(self) -> Iterator[Metric]:
        for name, (head, samples) in self.families.items():
            metric = Metric(name, head["documentation"], head["type"], head["unit"])
            for sample_name, labels, value in samples.values():
                metric.add_sample(sample_name, labels, value)
            yield metric


class _IndexCollector(Collector):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Any]:
        from gateway.index import events, queue, repository
        from gateway.index.database import reading
        from gateway.index.schema import Instance

        up = GaugeMetricFamily(f"{PREFIX}_index_up", "1 when the index database answers")
        try:
            with reading(self.engine) as connection:
                instance = Instance.__table__.c
                spooled = connection.execute(
                    select(func.count()).where(instance.state == repository.SPOOLED)
                ).scalar_one()
                statuses = queue.queue_status(connection)
                backlog = events.delivery_backlog(connection)
                unrouted = queue.unrouted_count(connection)
        except SQLAlchemyError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield GaugeMetricFamily(f"{PREFIX}_spool_backlog",
                                "Instances in a spool, not yet in the object store",
                                value=spooled)
        yield GaugeMetricFamily(f"{PREFIX}_unrouted_instances",
                                "Current instances no route matched", value=unrouted)
        depth = GaugeMetricFamily(f"{PREFIX}_forward_queue_depth",
                                  "Forward jobs by destination and state",
                                  labels=["destination", "state"])
        age = GaugeMetricFamily(f"{PREFIX}_forward_queue_oldest_age_seconds",
                                "Age of the oldest undelivered job per destination",
                                labels=["destination"])
        now = dt.datetime.now(dt.UTC)
        for status in statuses:
            for state in ("pending", "in_flight", "retrying", "dead", "done"):
                depth.add_metric([status.destination, state], getattr(status, state))
            oldest = status.oldest_pending
            age.add_metric([status.destination],
                           (now - oldest).total_seconds() if oldest else 0.0)
        yield depth
        yield age
        sinks = GaugeMetricFamily(f"{PREFIX}_event_backlog",
                                  "Event deliveries by sink and state", labels=["sink", "state"])
        for sink, states in backlog.items():
            for state, count in states.items():
                sinks.add_metric([sink, state], count)
        yield sinks

