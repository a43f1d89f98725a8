"""Study events end to end: stability, revisions, every sink against a real receiver,
outages and recovery, HL7 out, and kill -9 between stability and delivery."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from sqlalchemy import create_engine, text

import gateway.events.watcher as watcher_module
from gateway.config import GatewayConfig
from gateway.index import events as index_events
from gateway.node import Node
from tests.helpers import dcmtk, hl7
from tests.helpers.data import make_study
from tests.helpers.http_peers import fhir_server, webhook_receiver
from tests.helpers.nats import SYSTEM_NATS, delete_stream, nats_server, read_stream
from tests.helpers.net import free_port, wait_until
from tests.helpers.nodes import config_data, make_config, node_process, running_node, to_toml

pytestmark = pytest.mark.integration

FAST = {"stable_seconds": 1.0, "check_seconds": 0.2, "timezone": "UTC"}
RETRY = {"initial_seconds": 0.2, "max_seconds": 0.5, "max_attempts": 100}


@contextmanager
def events_node(tmp_path: Path, database_url: str, sinks: list[dict[str, Any]],
                **sections: Any) -> Iterator[Node]:
    config = make_config(tmp_path / "gw", database_url,
                         **{"events": FAST, "event_sink": sinks, **sections})
    with running_node(config) as node:
        yield node


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def deliveries(node: Node) -> dict[str, int]:
    with node.engine.connect() as connection:
        rows = connection.execute(
            text("SELECT state, count(*) FROM event_delivery GROUP BY state"))
        return {row[0]: row[1] for row in rows}


def test_a_stable_study_raises_one_event_after_the_quiet_period(
    tmp_path: Path, database_url: str
) -> None:
    out = tmp_path / "events.jsonl"
    with events_node(tmp_path, database_url, [{"name": "local", "type": "file",
                                               "path": str(out)}]) as node:
        files = make_study(tmp_path / "s", 2)
        started = time.monotonic()
        assert dcmtk.storescu(node.receiver.port, files).ok
        time.sleep(0.5)
        assert lines(out) == [], "not stable yet"
        wait_until(lambda: len(lines(out)) == 1, 10)
        assert time.monotonic() - started >= 1.0
        time.sleep(1.5)
        (event,) = lines(out)
    assert event["type"] == "ImagingStudy" and event["version"] == 1
    assert event["study_instance_uid"] == str(dcmread(files[0]).StudyInstanceUID)
    assert event["resource"]["numberOfInstances"] == 2
    assert set(event) >= {"event_id", "created_at", "fhir_version", "resource_key"}


def test_late_instances_raise_a_revision_with_a_higher_version(
    tmp_path: Path, database_url: str
) -> None:
    out = tmp_path / "events.jsonl"
    with events_node(tmp_path, database_url, [{"name": "local", "type": "file",
                                               "path": str(out)}]) as node:
        first = make_study(tmp_path / "a", 2)
        study_uid = str(dcmread(first[0]).StudyInstanceUID)
        assert dcmtk.storescu(node.receiver.port, first).ok
        wait_until(lambda: len(lines(out)) == 1, 10)
        late = make_study(tmp_path / "b", 1, study_uid=study_uid)
        assert dcmtk.storescu(node.receiver.port, late).ok
        wait_until(lambda: len(lines(out)) == 2, 10)
    one, two = lines(out)
    assert (one["version"], two["version"]) == (1, 2)
    assert one["event_id"] != two["event_id"]
    assert two["resource"]["numberOfInstances"] == 3


def test_the_issuer_of_patient_id_is_carried_in_the_imaging_study_subject(
    tmp_path: Path, database_url: str
) -> None:
    out = tmp_path / "events.jsonl"
    events = {**FAST, "patient_identifier_system": "urn:oid:1.2.3.5"}  # for IDs without one
    with events_node(tmp_path, database_url, [{"name": "local", "type": "file",
                                               "path": str(out)}], events=events) as node:
        for issuer in ("1.2.826.0.1.3680043.8.498.77", "HOSP-A"):
            (path,) = make_study(tmp_path / issuer, 1, patient_id="PAT-ISS")
            ds = dcmread(path)
            ds.IssuerOfPatientID = issuer
            ds.save_as(path)
            assert dcmtk.storescu(node.receiver.port, [path]).ok
        wait_until(lambda: len(lines(out)) == 2, 10)
    subjects = [event["resource"]["subject"]["identifier"] for event in lines(out)]
    # An OID is the identifier's system; any other issuer is named as the assigner (the
    # configured system is for Patient IDs without an issuer).
    assert {"value": "PAT-ISS", "system": "urn:oid:1.2.826.0.1.3680043.8.498.77"} in subjects
    assert {"value": "PAT-ISS", "assigner": {"display": "HOSP-A"}} in subjects


def test_fhir_sink_uses_conditional_updates_so_replays_never_duplicate(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_FHIR_TOKEN", "s3cret-token")
    with fhir_server() as fhir:
        sink = {"name": "ehr", "type": "fhir", "url": fhir.url, "token_env": "TEST_FHIR_TOKEN",
                "retry": RETRY}
        with events_node(tmp_path, database_url, [sink]) as node:
            files = make_study(tmp_path / "a", 2)
            assert dcmtk.storescu(node.receiver.port, files).ok
            wait_until(lambda: deliveries(node).get("done") == 1, 15)
            late = make_study(tmp_path / "b", 1, study_uid=str(dcmread(files[0]).StudyInstanceUID))
            assert dcmtk.storescu(node.receiver.port, late).ok
            wait_until(lambda: deliveries(node).get("done") == 2, 15)
            with node.engine.begin() as connection:  # replay everything
                connection.execute(text("UPDATE event_delivery SET state = 'pending'"))
            node.dispatcher.wake()
            # The newest revision goes again; the older one must never follow it.
            wait_until(lambda: deliveries(node) == {"done": 1, "superseded": 1}, 15)
            wait_until(lambda: fhir.requests == 3, 15)
        (study,) = fhir.resources["ImagingStudy"]
    assert study["numberOfInstances"] == 3
    assert study["meta"]["versionId"] == "3"
    assert set(fhir.authorizations) == {"Bearer s3cret-token"}


def test_fhir_sink_outage_is_retried_until_the_server_returns(
    tmp_path: Path, database_url: str
) -> None:
    with fhir_server() as fhir:
        fhir.available = False
        sink = {"name": "ehr", "type": "fhir", "url": fhir.url, "retry": RETRY}
        with events_node(tmp_path, database_url, [sink]) as node:
            assert dcmtk.storescu(node.receiver.port, make_study(tmp_path / "s", 1)).ok
            wait_until(lambda: fhir.requests >= 2, 15, message="retries during the outage")
            with node.engine.connect() as connection:
                error = connection.execute(
                    text("SELECT last_error FROM event_delivery")).scalar_one()
            assert "503" in error
            fhir.available = True
            wait_until(lambda: deliveries(node).get("done") == 1, 15)
        assert len(fhir.resources["ImagingStudy"]) == 1


def test_webhook_sink_signs_every_delivery_and_recovers_from_an_outage(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_WEBHOOK_SECRET", "hmac-key")
    with webhook_receiver(b"hmac-key") as hook:
        hook.status = 500
        sink = {"name": "hook", "type": "webhook", "url": hook.url,
                "secret_env": "TEST_WEBHOOK_SECRET", "retry": RETRY}
        with events_node(tmp_path, database_url, [sink]) as node:
            assert dcmtk.storescu(node.receiver.port, make_study(tmp_path / "s", 1)).ok
            wait_until(lambda: _attempts(node) >= 2, 15)
            hook.status = 200
            wait_until(lambda: len(hook.deliveries) == 1, 15)
    (delivery,) = hook.deliveries
    assert hook.bad_signatures == 0
    assert delivery["headers"]["X-Dicom-Gateway-Event"] == delivery["body"]["event_id"]
    assert delivery["body"]["type"] == "ImagingStudy"


def _attempts(node: Node) -> int:
    with node.engine.connect() as connection:
        return int(connection.execute(
            text("SELECT coalesce(max(attempts), 0) FROM event_delivery")).scalar_one())


def test_nats_sink_publishes_to_jetstream_with_the_event_id_for_deduplication(
    tmp_path: Path, database_url: str
) -> None:
    stream = f"GW_{uuid.uuid4().hex[:10].upper()}"
    subject = f"dicom.{stream.lower()}"
    sink = {"name": "bus", "type": "nats", "servers": [SYSTEM_NATS], "subject": subject,
            "stream": stream, "retry": RETRY}
    try:
        with events_node(tmp_path, database_url, [sink]) as node:
            assert dcmtk.storescu(node.receiver.port, make_study(tmp_path / "s", 1)).ok
            wait_until(lambda: deliveries(node).get("done") == 1, 20)
            with node.engine.begin() as connection:  # deliver the same event again
                connection.execute(text("UPDATE event_delivery SET state = 'pending'"))
            node.dispatcher.wake()
            wait_until(lambda: _attempts(node) == 2 and deliveries(node).get("done") == 1, 20)
        messages = read_stream(SYSTEM_NATS, stream, subject)
    finally:
        delete_stream(SYSTEM_NATS, stream)
    (message,) = messages  # the second publish was a duplicate for JetStream
    assert message["headers"]["Nats-Msg-Id"] == message["body"]["event_id"]
    assert message["body"]["type"] == "ImagingStudy"


def test_nats_outage_then_recovery(tmp_path: Path, database_url: str) -> None:
    with nats_server(tmp_path / "nats") as server:
        sink = {"name": "bus", "type": "nats", "servers": [server.url], "subject": "dicom.events",
                "stream": "DICOM_EVENTS", "timeout": 2.0, "retry": RETRY}
        with events_node(tmp_path, database_url, [sink]) as node:
            server.stop()
            assert dcmtk.storescu(node.receiver.port, make_study(tmp_path / "s", 1)).ok
            wait_until(lambda: _attempts(node) >= 2, 20, message="retries during the outage")
            server.start()
            wait_until(lambda: deliveries(node).get("done") == 1, 30)
        assert len(read_stream(server.url, "DICOM_EVENTS", "dicom.events")) == 1


@pytest.mark.parametrize("message", ["ORU^R01", "ORM^O01"])
def test_hl7_study_available_message_is_sent_and_acknowledged(
    tmp_path: Path, database_url: str, message: str
) -> None:
    with hl7.mllp_receiver("AA") as ris:
        target = {"name": "ris", "host": "127.0.0.1", "port": ris.port, "message": message,
                  "receiving_application": "RIS", "retry": RETRY}
        with events_node(tmp_path, database_url, [], hl7_destination=[target]) as node:
            files = make_study(tmp_path / "s", 2, accession_number="ACC55")
            assert dcmtk.storescu(node.receiver.port, files).ok
            wait_until(lambda: deliveries(node).get("done") == 1, 15)
        (sent,) = ris.received
    assert hl7.segment(sent, "MSH")[8].startswith(message)
    assert hl7.segment(sent, "OBR")[18] == "ACC55"
    if message == "ORU^R01":
        assert hl7.segment(sent, "OBX")[5] == str(dcmread(files[0]).StudyInstanceUID)
    else:
        assert hl7.segment(sent, "ORC")[1] == "SC" and hl7.segment(sent, "ORC")[5] == "CM"


@pytest.mark.parametrize(("answer", "final"), [("AE", "pending"), ("AR", "dead")])
def test_hl7_nacks_follow_the_documented_policy(
    tmp_path: Path, database_url: str, answer: str, final: str
) -> None:
    with hl7.mllp_receiver(answer) as ris:
        target = {"name": "ris", "host": "127.0.0.1", "port": ris.port, "retry": RETRY}
        with events_node(tmp_path, database_url, [], hl7_destination=[target]) as node:
            assert dcmtk.storescu(node.receiver.port, make_study(tmp_path / "s", 1)).ok
            wait_until(lambda: len(ris.received) >= 2 if final == "pending"
                       else deliveries(node).get("dead") == 1, 15)
            state = deliveries(node)
    assert state.get(final, 0) + state.get("in_flight", 0) >= 1
    assert state.get("done", 0) == 0


def test_hl7_destination_that_never_acks_is_retried_after_its_timeout(
    tmp_path: Path, database_url: str
) -> None:
    with hl7.mllp_receiver(None) as ris:  # takes the message, never answers
        target = {"name": "ris", "host": "127.0.0.1", "port": ris.port, "timeout": 0.5,
                  "retry": RETRY}
        with events_node(tmp_path, database_url, [], hl7_destination=[target]) as node:
            assert dcmtk.storescu(node.receiver.port, make_study(tmp_path / "s", 1)).ok
            wait_until(lambda: len(ris.received) >= 2, 15, message="sent again after a timeout")
            with node.engine.connect() as connection:
                delivery = connection.execute(
                    text("SELECT state, last_error FROM event_delivery")).one()
    assert len(set(ris.received)) == 1, "the same message again"
    assert delivery.state in ("pending", "in_flight"), "neither delivered nor dead"
    assert "timed out" in delivery.last_error


def test_kill_9_between_stability_and_delivery_loses_and_duplicates_nothing(
    tmp_path: Path, database_url: str
) -> None:
    with webhook_receiver(b"k") as hook:
        hook.status = 503  # the receiver is down when the event is raised
        root = tmp_path / "node"
        sections = {"events": FAST, "event_sink": [{"name": "hook", "type": "webhook",
                                                     "url": hook.url, "secret_env": "HOOK_KEY",
                                                     "retry": RETRY}]}
        with node_process(root, database_url, **sections) as node:
            node.env["HOOK_KEY"] = "k"
            node.stop()
            node.start()
            assert dcmtk.storescu(node.port, make_study(tmp_path / "s", 2)).ok
            engine = create_engine(database_url)
            try:
                wait_until(lambda: _scalar(engine, "SELECT count(*) FROM event") == 1, 15)
                node.kill9()
                hook.status = 200
                node.start()
                wait_until(lambda: len(hook.deliveries) == 1, 20)
                time.sleep(2.0)  # long enough for a duplicate or a second event to show up
                assert _scalar(engine, "SELECT count(*) FROM event") == 1
                assert _scalar(engine, "SELECT max(event_version) FROM study") == 1
            finally:
                engine.dispose()
    assert len(hook.deliveries) == 1
    assert hook.deliveries[0]["body"]["version"] == 1


def _scalar(engine: Any, sql: str) -> Any:
    with engine.connect() as connection:
        return connection.execute(text(sql)).scalar()


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=60, check=False)


def test_event_and_order_commands(tmp_path: Path, database_url: str) -> None:
    out = tmp_path / "events.jsonl"
    data = config_data(tmp_path / "gw", database_url, events=FAST,
                       event_sink=[{"name": "local", "type": "file", "path": str(out)},
                                   {"name": "hook", "type": "webhook",
                                    "url": f"http://127.0.0.1:{free_port()}/x",
                                    "secret_env": "NONE_SET",
                                    "retry": {"initial_seconds": 0.1, "max_seconds": 0.1,
                                              "max_attempts": 1}}],
                       hl7={"listen_port": 0, "host": "127.0.0.1"})
    config = tmp_path / "gateway.toml"
    config.write_text(to_toml(data))
    with running_node(GatewayConfig.model_validate(data)) as node:
        assert node.hl7_listener is not None
        hl7.send(node.hl7_listener.port, hl7.orm_o01("ACC-CLI", patient_id="PAT-CLI"))
        files = make_study(tmp_path / "s", 1, patient_id="PAT-CLI", accession_number="ACC-CLI")
        assert dcmtk.storescu(node.receiver.port, files).ok
        wait_until(lambda: deliveries(node).get("dead") == 1, 15)
        listing = _cli(config, "events")
        assert "ImagingStudy" in listing.stdout and "local: done" in listing.stdout
        assert "hook: dead" in listing.stdout
        orders_out = _cli(config, "orders").stdout
        assert "accession ACC-CLI" in orders_out and "1 study(ies)" in orders_out
        as_json = json.loads(_cli(config, "events", "--json").stdout)
        assert as_json[0]["kind"] == "ImagingStudy"


def test_requeued_event_dead_letters_are_delivered_once_by_id_study_or_sink(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_HOOK_SECRET", "k")
    with webhook_receiver(b"k") as hook:
        hook.status = 503  # down: with one attempt allowed, every delivery is a dead letter
        sink = {"name": "hook", "type": "webhook", "url": hook.url,
                "secret_env": "TEST_HOOK_SECRET",
                "retry": {"initial_seconds": 0.1, "max_seconds": 0.1, "max_attempts": 1}}
        data = config_data(tmp_path / "gw", database_url, events=FAST, event_sink=[sink])
        config = tmp_path / "gateway.toml"
        config.write_text(to_toml(data))
        with running_node(GatewayConfig.model_validate(data)) as node:
            studies = [make_study(tmp_path / name, 1) for name in ("a", "b", "c")]
            uids = [str(dcmread(files[0]).StudyInstanceUID) for files in studies]
            assert dcmtk.storescu(node.receiver.port, [f for files in studies for f in files]).ok
            wait_until(lambda: deliveries(node).get("dead") == 3, 15)
            hook.status = 200  # back, but dead letters wait for an operator

            def requeue(*args: str) -> None:
                delivered = len(hook.deliveries)
                requeued = _cli(config, "requeue-events", *args).stdout.strip()
                assert requeued == "requeued 1 event delivery(ies)", args
                wait_until(lambda: len(hook.deliveries) == delivered + 1, 15)

            # the delivery id as the events command shows it: "dead (#<id>: <reason>)"
            (event,) = json.loads(_cli(config, "events", "--study", uids[0], "--json").stdout)
            requeue("--id", event["deliveries"]["hook"].split("#")[1].split(":")[0])
            requeue("--study", uids[1])
            requeue("--sink", "hook")
            assert _cli(config, "requeue-events").returncode == 2, "needs --id, --sink or --study"
            assert deliveries(node) == {"done": 3}
    assert [d["body"]["study_instance_uid"] for d in hook.deliveries] == uids


def test_a_study_whose_data_cannot_be_mapped_does_not_hold_up_the_others(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "events.jsonl"
    with events_node(tmp_path, database_url, [{"name": "local", "type": "file",
                                               "path": str(out)}]) as node:
        odd = make_study(tmp_path / "odd", 1)
        ds = dcmread(odd[0])
        ds.StudyDate = "20240230"  # not a date
        ds.InstanceNumber = "-5"  # valid DICOM, not a FHIR unsignedInt
        ds.ReferringPhysicianName = "^"
        ds.save_as(odd[0])
        assert dcmtk.storescu(node.receiver.port, odd).ok
        wait_until(lambda: len(lines(out)) == 1, 10)
        (event,) = lines(out)
        assert "started" not in event["resource"]
        assert "number" not in event["resource"]["series"][0]["instance"][0]
        # A defect in building one study's events: recorded, and the next study still goes.
        real = watcher_module.build_events
        broken = str(dcmread(make_study(tmp_path / "broken", 1)[0]).StudyInstanceUID)

        def build(study: Any, **kwargs: Any) -> Any:
            if study.summary.study_instance_uid == broken:
                raise ValueError("Doe^Jane is not a valid anything")  # quotes data, like pydantic
            return real(study, **kwargs)

        monkeypatch.setattr(watcher_module, "build_events", build)
        assert dcmtk.storescu(node.receiver.port, list((tmp_path / "broken").iterdir())).ok
        assert dcmtk.storescu(node.receiver.port, make_study(tmp_path / "fine", 1)).ok
        wait_until(lambda: len(lines(out)) == 2, 10)
        with node.engine.connect() as connection:
            error = connection.execute(text(
                "SELECT event_error FROM study WHERE study_instance_uid = :uid"),
                {"uid": broken}).scalar_one()
    assert error.startswith("ValueError at ")
    assert "Doe^Jane" not in error


def test_a_late_commit_stamped_earlier_still_raises_a_revision(
    tmp_path: Path, database_url: str
) -> None:
    out = tmp_path / "events.jsonl"
    with events_node(tmp_path, database_url, [{"name": "local", "type": "file",
                                               "path": str(out)}]) as node:
        first = make_study(tmp_path / "a", 1)
        assert dcmtk.storescu(node.receiver.port, first).ok
        wait_until(lambda: len(lines(out)) == 1, 10)
        # Another node whose clock is a minute behind commits an instance of the study.
        node.ingestor.clock = lambda: dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
        late = make_study(tmp_path / "b", 1, study_uid=str(dcmread(first[0]).StudyInstanceUID))
        assert dcmtk.storescu(node.receiver.port, late).ok
        wait_until(lambda: len(lines(out)) == 2, 10)
    assert [event["version"] for event in lines(out)] == [1, 2]


def test_an_older_revision_waiting_for_a_retry_never_overwrites_a_newer_one(
    tmp_path: Path, database_url: str
) -> None:
    with fhir_server() as fhir:
        fhir.available = False
        sink = {"name": "ehr", "type": "fhir", "url": fhir.url, "retry": RETRY}
        with events_node(tmp_path, database_url, [sink]) as node:
            files = make_study(tmp_path / "a", 1)
            assert dcmtk.storescu(node.receiver.port, files).ok
            wait_until(lambda: fhir.requests >= 1, 10)
            late = make_study(tmp_path / "b", 1, study_uid=str(dcmread(files[0]).StudyInstanceUID))
            assert dcmtk.storescu(node.receiver.port, late).ok
            wait_until(lambda: deliveries(node).get("superseded") == 1, 10)
            fhir.available = True
            wait_until(lambda: deliveries(node).get("done") == 1, 15)
            time.sleep(1.0)
        (study,) = fhir.resources["ImagingStudy"]
    assert study["numberOfInstances"] == 2
    assert study["meta"]["versionId"] == "1", "only the newest revision was sent"


def test_a_revision_in_flight_when_a_newer_one_arrives_is_superseded_at_its_retry(
    tmp_path: Path, database_url: str
) -> None:
    out = tmp_path / "events.jsonl"
    sink = {"name": "local", "type": "file", "path": str(out), "retry": RETRY}
    with events_node(tmp_path, database_url, [sink]) as node:
        node.dispatcher.stop()  # drive the outbox by hand
        (first,) = make_study(tmp_path / "a", 1)
        assert dcmtk.storescu(node.receiver.port, [first]).ok
        wait_until(lambda: deliveries(node) == {"pending": 1}, 10)
        with node.engine.begin() as connection:  # v1 is out being tried...
            connection.execute(text("UPDATE event_delivery SET state = 'in_flight'"))
        late = make_study(tmp_path / "b", 1, study_uid=str(dcmread(first).StudyInstanceUID))
        assert dcmtk.storescu(node.receiver.port, late).ok
        wait_until(lambda: deliveries(node) == {"in_flight": 1, "pending": 1}, 10)
        with node.engine.begin() as connection:  # ...fails, and comes back for a retry
            connection.execute(text(
                "UPDATE event_delivery SET state = 'pending' WHERE state = 'in_flight'"))
            claim = index_events.claim_deliveries(
                connection, "local", owner=f"{node.name}:t", now=dt.datetime.now(dt.UTC),
                lease=dt.timedelta(seconds=60), limit=1)  # v1 alone fills the first look
        states = deliveries(node)
    assert [delivery.version for delivery in claim.deliveries] == [2]
    assert claim.superseded == 1
    assert states == {"in_flight": 1, "superseded": 1}


def test_file_sink_that_cannot_be_written_is_retried_until_it_can(
    tmp_path: Path, database_url: str
) -> None:
    blocker = tmp_path / "events"
    blocker.write_text("a file where the sink's directory should be")
    out = blocker / "events.jsonl"
    with events_node(tmp_path, database_url, [{"name": "local", "type": "file",
                                               "path": str(out), "retry": RETRY}]) as node:
        assert dcmtk.storescu(node.receiver.port, make_study(tmp_path / "s", 1)).ok
        wait_until(lambda: _attempts(node) >= 2, 10, message="failed attempts")
        blocker.unlink()
        wait_until(lambda: len(lines(out)) == 1, 15)
        # the line is written before the delivery is recorded as done
        wait_until(lambda: deliveries(node) == {"done": 1}, 10)
