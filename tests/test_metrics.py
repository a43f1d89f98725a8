"""Prometheus metrics move as work happens."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from gateway.node import Node
from tests.helpers import dcmtk, hl7
from tests.helpers.admin_http import AdminClient, metric
from tests.helpers.data import make_study
from tests.helpers.net import free_port, wait_until
from tests.helpers.nodes import make_config, running_node
from tests.helpers.peers import status_peer
from tests.test_admin_api import http_section

pytestmark = pytest.mark.integration

P = "dicom_gateway_"


def _client(node: Node) -> AdminClient:
    assert node.admin_server is not None
    return AdminClient(node.admin_server.port)


def _dest(name: str, port: int, max_attempts: int = 100) -> dict[str, Any]:
    return {"name": name, "ae_title": "PEER", "host": "127.0.0.1", "port": port, "timeout": 3.0,
            "retry": {"initial_seconds": 0.1, "max_seconds": 0.2,
                      "max_attempts": max_attempts}}


def test_receiving_moves_association_instance_byte_and_latency_metrics(
    tmp_path: Path, database_url: str
) -> None:
    config = make_config(tmp_path, database_url, http=http_section(tmp_path))
    with running_node(config) as node:
        api = _client(node)
        before = api.metrics()
        assert metric(before, f"{P}index_up") == 1
        paths = make_study(tmp_path / "s", 4)
        assert dcmtk.storescu(node.receiver.port, paths, calling="CT01").ok
        assert dcmtk.storescu(node.receiver.port, paths[:1], calling="CT01").ok  # duplicate
        assert not dcmtk.storescu(node.receiver.port, paths[:1], calling="NOBODY").ok
        wait_until(lambda: metric(api.metrics(), f"{P}associations_total",
                                  calling_ae="CT01", outcome="released") == 2, 10)
        after = api.metrics()
    assert metric(after, f"{P}associations_total", calling_ae="NOBODY",
                  outcome="rejected") == 1
    assert metric(after, f"{P}instances_received_total", calling_ae="CT01",
                  outcome="stored") == 4
    assert metric(after, f"{P}instances_received_total", calling_ae="CT01",
                  outcome="duplicate") == 1
    # five accepted (four stored, one duplicate), each about its file's size
    size = sum(p.stat().st_size for p in paths) + paths[0].stat().st_size
    assert 0.9 * size < metric(after, f"{P}bytes_received_total") < 1.1 * size
    assert metric(after, f"{P}store_seconds_count") == 5
    assert metric(after, f"{P}store_seconds_bucket", le="+Inf") == 5
    assert metric(after, f"{P}store_seconds_sum") > 0
    # one association at a time: every instance committed on its own
    assert metric(after, f"{P}index_commit_batch_size_count") == 5
    assert metric(after, f"{P}index_commit_batch_size_bucket", le="1.0") == 5


def test_a_failing_destination_shows_in_outcomes_queue_depth_age_and_dead_letters(
    tmp_path: Path, down_port: int, database_url: str
) -> None:
    down = down_port  # nobody listens here
    with dcmtk.storescp(tmp_path / "pacs", ae_title="PEER") as pacs:
        config = make_config(
            tmp_path / "gw", database_url, http=http_section(tmp_path),
            destination=[_dest("pacs", pacs.port), _dest("down", down, max_attempts=2)],
            route=[{"name": "all", "destinations": ["pacs", "down"]}],
        )
        with running_node(config) as node:
            api = _client(node)
            assert dcmtk.storescu(node.receiver.port, make_study(tmp_path / "s", 3)).ok
            wait_until(lambda: metric(api.metrics(), f"{P}forward_queue_depth",
                                      destination="down", state="dead") == 3, 30,
                       message="three dead letters for 'down'")
            wait_until(lambda: metric(api.metrics(), f"{P}forward_queue_depth",
                                      destination="pacs", state="done") == 3, 30)
            # Uploads follow once the arrivals pause (they yield to receiving).
            wait_until(lambda: metric(api.metrics(), f"{P}spool_backlog") == 0, 30)
            samples = api.metrics()
    assert metric(samples, f"{P}forward_outcomes_total", destination="pacs",
                  status_class="success") == 3
    # two tries each (max_attempts = 2), both failing to associate
    assert metric(samples, f"{P}forward_outcomes_total", destination="down",
                  status_class="transient") == 6
    assert metric(samples, f"{P}dead_letters_total", kind="forward", target="down") == 3
    assert metric(samples, f"{P}forward_queue_depth", destination="down", state="pending") == 0
    assert metric(samples, f"{P}forward_queue_oldest_age_seconds", destination="pacs") == 0
    assert metric(samples, f"{P}uploads_total", outcome="stored") == 3
    assert metric(samples, f"{P}spool_backlog") == 0


def test_a_held_queue_reports_its_depth_and_the_age_of_its_oldest_job(
    tmp_path: Path, down_port: int, database_url: str
) -> None:
    down = down_port
    config = make_config(tmp_path, database_url, http=http_section(tmp_path),
                         destination=[_dest("down", down)],
                         route=[{"name": "all", "destinations": ["down"]}])
    with running_node(config) as node:
        api = _client(node)
        assert dcmtk.storescu(node.receiver.port, make_study(tmp_path / "s", 2)).ok

        def waiting() -> float:
            samples = api.metrics()
            return sum(metric(samples, f"{P}forward_queue_depth", destination="down", state=s)
                       for s in ("pending", "retrying", "in_flight"))

        wait_until(lambda: waiting() == 2, 20)
        wait_until(lambda: metric(api.metrics(), f"{P}forward_queue_oldest_age_seconds",
                                  destination="down") >= 1.0, 20)


def test_hl7_messages_are_counted_by_type_and_ack_and_events_by_sink(
    tmp_path: Path, database_url: str
) -> None:
    hl7_port = free_port()
    out = tmp_path / "events.jsonl"
    config = make_config(
        tmp_path / "gw", database_url, http=http_section(tmp_path),
        hl7={"listen_port": hl7_port, "host": "127.0.0.1"},
        events={"stable_seconds": 1.0, "check_seconds": 0.2, "timezone": "UTC"},
        event_sink=[{"name": "local", "type": "file", "path": str(out)}],
    )
    with running_node(config) as node:
        api = _client(node)
        hl7.send(hl7_port, hl7.orm_o01("ACC-1"), hl7.orm_o01("ACC-2"), hl7.adt_a01("PAT1"))
        assert dcmtk.storescu(node.receiver.port, make_study(tmp_path / "s", 1)).ok
        wait_until(lambda: metric(api.metrics(), f"{P}event_deliveries_total", sink="local",
                                  outcome="success") == 1, 30)
        samples = api.metrics()
    assert metric(samples, f"{P}hl7_messages_total", message_type="ORM^O01", ack="AA") == 2
    assert metric(samples, f"{P}hl7_messages_total", message_type="ADT^A01", ack="AR") == 1
    assert metric(samples, f"{P}study_events_total") == 1
    assert metric(samples, f"{P}event_backlog", sink="local", state="done") == 1


def test_warnings_permanent_failures_and_a_spool_backlog_show_on_metrics(
    tmp_path: Path, database_url: str
) -> None:
    """A destination answering B007 (delivered with a warning), one answering A900 (a
    permanent failure: dead letter), and an object store that cannot be written: the
    spool backlog rises, then drains once the store is repaired."""
    objects = tmp_path / "objects"
    objects.write_text("a file where the object store's directory should be")
    with status_peer(tmp_path / "warn", ae_title="WARN", statuses=[0xB007], then=0xB007) as warn, \
            status_peer(tmp_path / "refuse", ae_title="REFUSE", statuses=[0xA900],
                        then=0xA900) as refuse:
        config = make_config(
            tmp_path / "gw", database_url, http=http_section(tmp_path),
            storage={"object_store": f"file://{objects}"},
            destination=[{**_dest("warn", warn.port), "ae_title": "WARN"},
                         {**_dest("refuse", refuse.port), "ae_title": "REFUSE"}],
            route=[{"name": "all", "destinations": ["warn", "refuse"]}],
        )
        started = dt.datetime.now(dt.UTC)
        with running_node(config) as node:
            api = _client(node)
            assert dcmtk.storescu(node.receiver.port, make_study(tmp_path / "s", 2)).ok
            wait_until(lambda: metric(api.metrics(), f"{P}dead_letters_total",
                                      kind="forward", target="refuse") == 2, 30)
            wait_until(lambda: metric(api.metrics(), f"{P}forward_outcomes_total",
                                      destination="warn", status_class="warning") == 2, 30)
            wait_until(lambda: metric(api.metrics(), f"{P}uploads_total",
                                      outcome="failed") >= 2, 30)
            held = api.metrics()
            objects.unlink()
            node.uploader.wake()
            wait_until(lambda: metric(api.metrics(), f"{P}spool_backlog") == 0, 60,
                       message="the spool backlog to drain after the store is repaired")
            drained = api.metrics()
            with node.engine.connect() as connection:
                attempted = connection.execute(
                    text("SELECT attempted_at FROM forward_attempt")).scalars().all()
        finished = dt.datetime.now(dt.UTC)
    assert metric(held, f"{P}spool_backlog") == 2
    assert metric(held, f"{P}forward_outcomes_total", destination="refuse",
                  status_class="permanent") == 2
    assert metric(held, f"{P}forward_queue_depth", destination="refuse", state="dead") == 2
    assert metric(drained, f"{P}uploads_total", outcome="stored") == 2
    # Every attempt carries the time it was made.
    assert len(attempted) == 4
    for value in attempted:  # a string through SQLite's text() query, a datetime on PG
        moment = dt.datetime.fromisoformat(value) if isinstance(value, str) else value
        aware = moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)
        assert started - dt.timedelta(seconds=1) <= aware <= finished


def test_the_worker_processes_counters_are_merged_into_the_listeners_output() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from gateway.metrics import Metrics, families_as_data

    listener, worker = Metrics(), Metrics()
    listener.instances.labels("CT01", "stored").inc(3)
    listener.uploads.labels("stored").inc(1)  # e.g. left from before a restart
    worker.uploads.labels("stored").inc(4)
    worker.uploads.labels("failed").inc(2)
    worker.forwards.labels("pacs", "success").inc(5)
    worker.store_seconds.observe(0.003)
    listener.store_seconds.observe(0.02)
    listener.remote_families = lambda: families_as_data(worker.registry)

    families = list(text_string_to_metric_families(listener.exposition().decode()))
    names = [family.name for family in families]
    assert len(names) == len(set(names))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in families for s in family.samples}
    cases = [
        ("dicom_gateway_instances_received_total",
         {"calling_ae": "CT01", "outcome": "stored"}, 3),     # listener only
        ("dicom_gateway_uploads_total", {"outcome": "stored"}, 5),  # summed
        ("dicom_gateway_uploads_total", {"outcome": "failed"}, 2),  # worker only
        ("dicom_gateway_forward_outcomes_total",
         {"destination": "pacs", "status_class": "success"}, 5),
        ("dicom_gateway_bytes_received_total", {}, 0),
        ("dicom_gateway_store_seconds_count", {}, 2),
        ("dicom_gateway_store_seconds_bucket", {"le": "0.005"}, 1),
        ("dicom_gateway_store_seconds_bucket", {"le": "0.025"}, 2),
    ]
    for name, labels, expected in cases:
        assert samples[(name, tuple(sorted(labels.items())))] == expected, (name, labels)
    types = {family.name: family.type for family in families}
    assert types["dicom_gateway_uploads"] == "counter"
    assert types["dicom_gateway_store_seconds"] == "histogram"


def test_without_a_worker_process_the_output_is_the_registrys() -> None:
    from prometheus_client import generate_latest

    from gateway.metrics import Metrics

    metrics = Metrics()
    metrics.uploads.labels("stored").inc()
    assert metrics.exposition() == generate_latest(metrics.registry)
