"""Logs: structured JSON, library logs in the same pipeline, no PHI by default."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog
from sqlalchemy.exc import IntegrityError

from gateway.config import LoggingConfig
from gateway.index.database import describe_error
from gateway.logs import REDACTED, RedactPHI, configure_logging


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
