"""Index-size scaling: ingest rate with an empty index vs. 100,000 instances already in it.

For each database (SQLite, PostgreSQL) two templates are made once: *empty* (the gateway
started once on it, so it holds exactly the migrated schema) and *full* (empty plus
100,000 synthetic instances bulk-inserted to look like ingested, uploaded, forwarded and
evented rows). Every measurement starts the gateway on a fresh copy of a template and
times small2000.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import Connection, Engine, Table, create_engine, text

from bench import targets
from bench.measure import Context, Measurement, run_directory, senders, timeout_for, verify_count
from bench.processes import BenchError
from bench.workloads import MR_IMAGE_STORAGE, Workload

POSTGRES_ADMIN_URL = os.environ.get(
    "BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
PREPOPULATED_STUDIES = 1000
SERIES_PER_STUDY = 2
INSTANCES_PER_SERIES = 50
BATCH = 5000
STATES = ("empty", "100k")


@dataclass
class Template:
    """How to get a fresh database holding one template's contents."""

    kind: str
    make_copy: Callable[[Path], str]
    """Copy the template for a run (given its directory); returns the database URL."""
    drop_copy: Callable[[str], None]


def measure(ctx: Context, workload: Workload, template: Template, state: str,
            run: int) -> Measurement:
    """small2000 into a fresh copy of *template*; rate in instances per second."""
    target = f"gateway-{template.kind}-{state}"
    result = Measurement(workload.name, "scaling", target, run, workload.instances)
    expected = workload.instances + (prepopulated_instances() if state == "100k" else 0)
    with run_directory(ctx, f"scaling-{target}-{run}", result) as run_dir:
        url = template.make_copy(run_dir)
        try:
            with targets.gateway(run_dir, database=url) as node:
                calling = targets.INGEST_CALLING_AE
                with senders(ctx, workload, node, calling, run_dir / "senders") as running:
                    result.seconds = running.wait(timeout_for(workload))
                verify_count(node, expected)
                result.rss_main, result.rss_total = node.peak_rss()
            result.detail["rate"] = workload.instances / result.seconds
        finally:
            template.drop_copy(url)
    return result


def prepopulated_instances() -> int:
    return PREPOPULATED_STUDIES * SERIES_PER_STUDY * INSTANCES_PER_SERIES


@contextmanager
def sqlite_templates(ctx: Context) -> Iterator[dict[str, Template]]:
    """SQLite template files; a run copies one into its directory."""
    base = ctx.scratch / "scaling-sqlite-templates"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    try:
        empty = base / "empty.db"
        migrate_with_gateway(base / "migrate", f"sqlite:///{empty}")
        full = base / "full.db"
        shutil.copy2(empty, full)
        engine = create_engine(f"sqlite:///{full}")
        try:
            prepopulate(engine)
        finally:
            engine.dispose()
        for path in (empty, full):
            # A run copies only the database file: everything must be in it.
            with closing(sqlite3.connect(path)) as connection:
                connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")

        def copier(source: Path) -> Callable[[Path], str]:
            def make_copy(run_dir: Path) -> str:
                shutil.copy2(source, run_dir / "index.db")
                return targets.sqlite_url(run_dir)
            return make_copy

        yield {
            "empty": Template("sqlite", copier(empty), lambda _url: None),
            "100k": Template("sqlite", copier(full), lambda _url: None),
        }
    finally:
        shutil.rmtree(base, ignore_errors=True)


@contextmanager
def postgres_templates(ctx: Context) -> Iterator[dict[str, Template]]:
    """Template databases on the local PostgreSQL; a run gets ``CREATE DATABASE ...
    TEMPLATE``. Every database made here is dropped at the end."""
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    prefix = f"bench_gateway_{os.getpid()}"
    made: list[str] = []

    def create(name: str, template: str | None = None) -> str:
        clause = f" TEMPLATE {template}" if template else ""
        with admin.connect() as connection:
            connection.execute(text(f"CREATE DATABASE {name}{clause}"))
        made.append(name)
        return admin.url.set(database=name).render_as_string(hide_password=False)

    def drop(name: str) -> None:
        with admin.connect() as connection:
            connection.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        if name in made:
            made.remove(name)

    try:
        with admin.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as exc:
        admin.dispose()
        raise BenchError(f"PostgreSQL at {POSTGRES_ADMIN_URL} is not reachable: {exc}") from exc
    try:
        migrate_with_gateway(ctx.scratch / "scaling-postgres-migrate", create(f"{prefix}_empty"))
        engine = create_engine(create(f"{prefix}_full", f"{prefix}_empty"))
        try:
            prepopulate(engine)
        finally:
            engine.dispose()

        def copier(template: str) -> Callable[[Path], str]:
            def make_copy(_run_dir: Path) -> str:
                return create(f"{prefix}_run_{uuid.uuid4().hex[:8]}", template)
            return make_copy

        def drop_url(url: str) -> None:
            drop(url.rsplit("/", 1)[1])

        yield {
            "empty": Template("postgresql", copier(f"{prefix}_empty"), drop_url),
            "100k": Template("postgresql", copier(f"{prefix}_full"), drop_url),
        }
    finally:
        for name in list(made):
            drop(name)
        admin.dispose()


def migrate_with_gateway(run_dir: Path, database: str) -> None:
    """Start the gateway once on *database* so it creates its own schema, then stop it."""
    try:
        with targets.gateway(run_dir, database=database):
            pass
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


# --- the synthetic history ---------------------------------------------------------------


def _tables() -> dict[str, Table]:
    from gateway.index import schema

    return {
        name: cast(Table, model.__table__)
        for name, model in (
            ("patient", schema.Patient), ("study", schema.Study), ("series", schema.Series),
            ("instance", schema.Instance), ("forward_job", schema.ForwardJob),
            ("association", schema.Association), ("event", schema.Event),
            ("event_delivery", schema.EventDelivery),
        )
    }


def _insert(connection: Connection, table: Table, rows: list[dict[str, Any]]) -> list[int]:
    """executemany in batches; the generated primary keys, in the order of *rows*."""
    ids: list[int] = []
    for start in range(0, len(rows), BATCH):
        batch = rows[start:start + BATCH]
        if "id" in table.c and table.c.id.autoincrement and "id" not in batch[0]:
            statement = table.insert().returning(table.c.id, sort_by_parameter_order=True)
            ids.extend(int(row[0]) for row in connection.execute(statement, batch))
        else:
            connection.execute(table.insert(), batch)
    return ids


def prepopulate(engine: Engine) -> None:
    """100,000 instances in 1,000 studies (one patient each, two series of 50), stored in
    the object store, forwarded (one done job each), and evented (one ImagingStudy event
    delivered to the file sink), received over the last 30 days."""
    from gateway.objectstore import object_key

    tables = _tables()
    now = dt.datetime.now(dt.UTC)
    started = time.perf_counter()
    with engine.begin() as connection:
        for study_index in range(PREPOPULATED_STUDIES):
            when = now - dt.timedelta(days=30) + dt.timedelta(minutes=43 * study_index)
            _prepopulate_study(connection, tables, study_index, when, object_key)
    if time.perf_counter() - started > 3600:
        raise BenchError("prepopulating the index took over an hour")


def _prepopulate_study(connection: Connection, tables: dict[str, Table], index: int,
                       when: dt.datetime, object_key: Callable[[str, str, str, str], str]) -> None:
    patient_id = f"PRE{index:06d}"
    [patient_pk] = _insert(connection, tables["patient"], [{
        # as gateway.index.repository.patient_key makes it: id:<issuer>|<Patient ID>
        "patient_key": f"id:|{patient_id}", "patient_id": patient_id,
        "issuer_of_patient_id": "", "patient_name": f"PREPOP^{index:06d}",
        "patient_birth_date": "19700101", "patient_sex": "O", "updated_at": when,
    }])
    study_uid = generate_uid()
    instances = SERIES_PER_STUDY * INSTANCES_PER_SERIES
    [study_pk] = _insert(connection, tables["study"], [{
        "study_instance_uid": study_uid, "patient_pk": patient_pk,
        "accession_number": f"PRE{index:07d}", "study_date": when.strftime("%Y%m%d"),
        "study_time": when.strftime("%H%M%S"), "study_description": "PREPOPULATED",
        "study_id": str(index), "referring_physician_name": "", "first_received_at": when,
        "last_received_at": when, "event_version": 1, "change_seq": instances,
        "evented_seq": instances, "evented_at": when + dt.timedelta(minutes=1),
    }])
    association_id = str(uuid.uuid4())
    _insert(connection, tables["association"], [{
        "id": association_id, "node": "node-prepopulated", "calling_ae": "MR01",
        "called_ae": "GATEWAY", "peer_address": "10.1.2.3", "peer_port": 40000 + index % 20000,
        "requested_at": when, "ended_at": when, "outcome": "released",
        "instances_received": instances, "instances_failed": 0, "duplicates": 0,
        "new_versions": 0, "bytes_received": instances * 9000,
    }])
    instance_rows: list[dict[str, Any]] = []
    for series_number in range(1, SERIES_PER_STUDY + 1):
        series_uid = generate_uid()
        [series_pk] = _insert(connection, tables["series"], [{
            "series_instance_uid": series_uid, "study_pk": study_pk, "modality": "MR",
            "series_number": series_number, "series_description": "PREPOPULATED",
            "body_part_examined": "HEAD", "last_received_at": when,
        }])
        for number in range(1, INSTANCES_PER_SERIES + 1):
            sop_uid = generate_uid()
            sha256 = os.urandom(32).hex()
            instance_rows.append(_instance_row(
                sop_uid, series_pk, number, sha256, association_id=association_id, when=when,
                key=object_key(study_uid, series_uid, sop_uid, sha256)))
    instance_pks = _insert(connection, tables["instance"], instance_rows)
    done = when + dt.timedelta(seconds=5)
    _insert(connection, tables["forward_job"], [{
        "instance_pk": pk, "destination": "archive", "route": "bench-route", "route_morph": None,
        "study_instance_uid": study_uid, "state": "done", "attempts": 1, "created_at": when,
        "updated_at": done, "completed_at": done, "last_status": 0,
    } for pk in instance_pks])
    event_id = str(uuid.uuid4())
    _insert(connection, tables["event"], [{
        "id": event_id, "study_pk": study_pk, "study_instance_uid": study_uid,
        "kind": "ImagingStudy", "resource_key": study_uid, "version": 1,
        "payload": '{"resourceType": "ImagingStudy", "status": "available"}',
        "created_at": when,
    }])
    _insert(connection, tables["event_delivery"], [{
        "event_id": event_id, "sink": "local", "state": "done", "attempts": 1,
        "created_at": when, "updated_at": when, "completed_at": when,
    }])


def _instance_row(sop_uid: str, series_pk: int, number: int, sha256: str, *,
                  association_id: str, when: dt.datetime, key: str) -> dict[str, Any]:
    return {
        "sop_instance_uid": sop_uid, "series_pk": series_pk, "sop_class_uid": MR_IMAGE_STORAGE,
        "instance_number": number, "number_of_frames": None,
        "transfer_syntax_uid": ExplicitVRLittleEndian, "size": 8960, "dataset_offset": 220,
        "sha256": sha256, "version": 1, "is_current": True, "state": "stored",
        "spool_name": None, "object_key": key, "received_by": "node-prepopulated",
        "calling_ae": "MR01", "called_ae": "GATEWAY", "association_id": association_id,
        "received_at": when, "stored_at": when + dt.timedelta(seconds=2),
        "upload_attempts": 0, "next_upload_at": None, "last_upload_error": None,
        "routed": True, "document_title": None, "document_mime_type": None,
        "content_date": None, "content_time": None, "sha1": None,
    }
