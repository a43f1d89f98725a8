"""Logs: structured JSON, library logs in the same pipeline, no PHI by default."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from sqlalchemy.exc import IntegrityError

from gateway.config import LoggingConfig
from gateway.index.database import describe_error
from gateway.logs import REDACTED, RedactPHI, configure_logging
from tests.helpers import dcmtk
from tests.helpers.data import make_study
from tests.helpers.net import wait_until
from tests.helpers.nodes import node_process


@pytest.mark.parametrize(
    ("enabled", "event", "expected"),
    [
        (True, {"patient_name": "Doe^Jane"}, {"patient_name": REDACTED}),
        (True, {"PatientID": "12345", "modality": "CT"}, {"PatientID": REDACTED, "modality": "CT"}),
        (True, {"patient_birth_date": ""}, {"patient_birth_date": ""}),
        (True, {"sop_instance_uid": "1.2.3"}, {"sop_instance_uid": "1.2.3"}),
        (False, {"patient_name": "Doe^Jane"}, {"patient_name": "Doe^Jane"}),
    ],
)
def test_phi_redaction(enabled: bool, event: dict[str, str], expected: dict[str, str]) -> None:
    assert RedactPHI(enabled)(None, "info", dict(event)) == expected


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    configure_logging(LoggingConfig(format="json", level="info"), stream, cache=False)
    try:
        yield stream
    finally:
        structlog.reset_defaults()
        root.handlers, root.level = saved


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_level_time_logger_and_context(json_log: io.StringIO) -> None:
    structlog.contextvars.bind_contextvars(assoc_id="a-1")
    try:
        structlog.get_logger("gateway.test").info("association_accepted", patient_id="X9")
    finally:
        structlog.contextvars.clear_contextvars()
    (line,) = _lines(json_log)
    assert line["event"] == "association_accepted"
    assert line["level"] == "info"
    assert line["assoc_id"] == "a-1"
    assert line["patient_id"] == REDACTED
    assert "timestamp" in line and line["logger"] == "gateway.test"


def test_library_logs_go_through_the_same_pipeline(json_log: io.StringIO) -> None:
    logging.getLogger("pynetdicom").warning("peer sent something odd")
    logging.getLogger("pynetdicom").info("chatty detail")  # below pynetdicom's threshold
    (line,) = _lines(json_log)
    assert line["event"] == "peer sent something odd"
    assert line["level"] == "warning"


def test_database_errors_are_logged_without_parameters() -> None:
    error = IntegrityError(
        "INSERT INTO patient (patient_id, patient_name) VALUES (?, ?)",
        ("PAT-77", "Doe^Jane"),
        Exception("UNIQUE constraint failed\nDETAIL: Key (patient_id)=(PAT-77) already exists"),
    )
    text = describe_error(error)
    assert "UNIQUE constraint failed" in text
    assert "PAT-77" not in text and "Doe^Jane" not in text


@pytest.mark.integration
def test_correlation_ids_tie_an_association_to_its_forwards_and_no_phi_is_logged(
    tmp_path: Path, down_port: int,
) -> None:
    down = down_port
    destination = {"name": "pacs", "ae_title": "PEER", "host": "127.0.0.1", "port": down,
                   "timeout": 3.0, "retry": {"initial_seconds": 0.1, "max_seconds": 0.2,
                                             "max_attempts": 1}}
    with node_process(tmp_path / "gw", f"sqlite:///{tmp_path / 'index.db'}",
                      destination=[destination],
                      route=[{"name": "all", "destinations": ["pacs"]}]) as node:
        paths = make_study(tmp_path / "s", 2, patient_id="PHI-PATIENT-77",
                           accession_number="ACC-77")
        assert dcmtk.storescu(node.port, paths).ok

        def named(name: str) -> list[dict[str, Any]]:
            return [e for e in node.log_events() if e.get("event") == name]

        wait_until(lambda: len(named("dead_letter")) == 2, 30)
        received = named("association_released")[0]["assoc_id"]
        forwards = named("forward_association")
        letters = named("dead_letter")
        text = node.log_path.read_text()
    assert {letter["assoc_id"] for letter in letters} == {received}
    assert all(f["received_association_ids"] == [received] for f in forwards)
    assert {letter["forward_association_id"] for letter in letters} <= {
        f["forward_association_id"] for f in forwards}
    assert "PHI-PATIENT-77" not in text
    assert "Synthetic" not in text  # the patient name


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("log_format", "stream_type", "json_expected"),
    [
        ("auto", io.StringIO, True),  # journald, a file, a container: JSON
        ("auto", _Terminal, False),  # an admin at a terminal: console lines
        ("json", _Terminal, True),
        ("console", io.StringIO, False),
    ],
)
def test_log_format_follows_the_config_and_the_terminal(
    log_format: str, stream_type: type[io.StringIO], json_expected: bool
) -> None:
    stream = stream_type()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    configure_logging(LoggingConfig.model_validate({"format": log_format}), stream, cache=False)
    try:
        structlog.get_logger("gateway.test").info("format_probe", calling_ae="CT01")
    finally:
        structlog.reset_defaults()
        root.handlers, root.level = saved
    line = stream.getvalue().strip().splitlines()[-1]
    assert "format_probe" in line
    if json_expected:
        assert json.loads(line)["event"] == "format_probe"
    else:
        with pytest.raises(json.JSONDecodeError):
            json.loads(line)
        assert "calling_ae=CT01" in line or "calling_ae" in line
