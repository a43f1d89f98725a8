"""Logging: structlog, configured once, JSON in production and console on a terminal.

Library logs (pynetdicom, SQLAlchemy, minio) go through the same pipeline, so they get
the same format, context variables and PHI redaction.
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, TextIO

import structlog

from gateway.config import LoggingConfig

# Event keys that carry patient-identifying data. They are replaced unless
# ``[logging] log_phi = true``.
PHI_KEYS = frozenset(
    {
        "patient_name",
        "patient_id",
        "patient_birth_date",
        "other_patient_ids",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "OtherPatientIDs",
    }
)
REDACTED = "<redacted>"

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_LEVELS["error"] = logging.ERROR


class RedactPHI:
    """structlog processor replacing patient-identifying values."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(
        self, logger: Any, method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        if self.enabled:
            for key in PHI_KEYS.intersection(event_dict):
                if event_dict[key] not in (None, ""):
                    event_dict[key] = REDACTED
        return event_dict


def configure_logging(
    config: LoggingConfig, stream: TextIO | None = None, *, cache: bool = True,
    process: str | None = None,
) -> None:
    """Configure structlog and the stdlib root logger. Call once at start-up.

    *cache* binds loggers on first use (faster); tests that reconfigure turn it off.
    *process* names the node's process in every line (``worker``); lines without it
    come from the listener.
    """
    stream = stream or sys.stdout
    level = _LEVELS[config.level]
    as_json = config.format == "json" or (config.format == "auto" and not stream.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.ExtraAdder(allow=("peer_address", "assoc_id")),
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        RedactPHI(enabled=not config.log_phi),
    ]
    if process is not None:
        shared.insert(0, _AddProcess(process))
    renderer: Any
    if as_json:
        renderer = structlog.processors.JSONRenderer()
        # Frame locals can hold raw header values (PHI): tracebacks without them.
        tracebacks = structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        )
        final = [tracebacks, renderer]
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
        final = [renderer]

    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=cache,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    # pynetdicom is chatty at INFO (one line per PDU event); its errors still come through.
    logging.getLogger("pynetdicom").setLevel(max(level, logging.WARNING))
    logging.getLogger("sqlalchemy").setLevel(logging.WARNING)
    # pydicom's warnings quote attribute values (PHI) when it meets non-conformant data.
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(max(level, logging.WARNING))


class _AddProcess:
    def __init__(self, process: str) -> None:
        self.process = process

    def __call__(self, _logger: Any, _method: str, event_dict: Any) -> Any:
        event_dict.setdefault("process", self.process)
        return event_dict


def failure_fields(exc: BaseException) -> dict[str, str]:
    """Log fields for an unexpected error without its message: messages of parsing and
    validation errors quote the values they choked on, which can be patient data."""
    frames = traceback.extract_tb(exc.__traceback__)[-4:]
    where = "; ".join(
        f"{Path(frame.filename).name}:{frame.lineno} in {frame.name}" for frame in frames
    )
    return {"error_type": type(exc).__name__, "where": where}


def get_logger(name: str) -> Any:
    """A structlog logger named after its module."""
    return structlog.get_logger(name)
