"""The OpenAPI 3.1 description of the admin API, served at ``/api/openapi.json``.

Kept next to the handlers in ``api.py``; ``tests/test_http_api.py`` checks that every
route is described and every described path is routed.
"""

from __future__ import annotations

from typing import Any

from gateway import __version__


def _query(name: str, description: str, *, kind: str = "string") -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": {"type": kind}}


def _limit(default: int) -> dict[str, Any]:
    return {"name": "limit", "in": "query", "required": False,
            "description": f"At most this many rows (default {default}, max 1000).",
            "schema": {"type": "integer", "minimum": 0, "maximum": 1000, "default": default}}


_OK_JSON = {"description": "OK", "content": {"application/json": {"schema": {}}}}
_ERRORS = {
    "400": {"description": "Bad request: the error field says which parameter and why.",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
    "401": {"description": "Missing or wrong bearer token.",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
    "503": {"description": "No API token configured, or the index database is unavailable.",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
}


def _get(summary: str, parameters: list[dict[str, Any]] | None = None, *,
         public: bool = False) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": summary, "parameters": parameters or [],
                                 "responses": {"200": _OK_JSON, **_ERRORS}}
    if public:
        operation["security"] = []
    return {"get": operation}


def _post(summary: str, body: dict[str, Any] | None = None,
          parameters: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": summary, "parameters": parameters or [],
                                 "responses": {"200": _OK_JSON, **_ERRORS}}
    if body is not None:
        operation["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": {"type": "object", "properties": body}}}}
    return {"post": operation}


_IDS = {"type": "array", "items": {"type": "integer"}}
_DESTINATION = [{"name": "name", "in": "path", "required": True,
                 "description": "The destination's name from [[destination]].",
                 "schema": {"type": "string"}}]

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "dicom-gateway admin API",
        "version": __version__,
        "description": (
            "Operations API of a dicom-gateway node. Every /api path except this "
            "description needs `Authorization: Bearer <token>` (the token comes from "
            "DICOM_GATEWAY_API_TOKEN or [http] token_file). Responses carry PHI "
            "(patient IDs and names in study searches): keep the server on loopback or "
            "behind TLS."
        ),
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {"Error": {"type": "object", "properties": {"error": {"type": "string"}}}},
    },
    "security": [{"bearer": []}],
    "paths": {
        "/healthz": _get("The process is alive (no dependencies checked).", public=True),
        "/readyz": _get("Ready to take work: index database, spool disk and object store "
                        "answer; 503 with the problems otherwise.", public=True),
        "/metrics": _get("Prometheus metrics (text format), names prefixed dicom_gateway_."),
        "/api/openapi.json": _get("This description.", public=True),
        "/api/status": _get("Node summary: version, uptime, throughput of the last five "
                            "minutes, spool backlog, unrouted instances, open associations."),
        "/api/associations": _get("The association log, newest first.", [
            _query("calling_ae", "Only this calling AE title."),
            _query("outcome", "established, released, aborted, rejected or interrupted."),
            _query("since", "ISO 8601 date-time (UTC if no offset): requested at or after."),
            _query("until", "ISO 8601 date-time: requested before."),
            _limit(100),
        ]),
        "/api/studies": _get("Study search, most recently received first, with the "
                             "delivery state per destination.", [
            _query("patient_id", "Exact PatientID."),
            _query("accession_number", "Exact AccessionNumber."),
            _query("study_date", "YYYYMMDD or a range YYYYMMDD-YYYYMMDD (open ends allowed)."),
            _query("modality", "A modality of one of the study's series (CT, MR, ...)."),
            _limit(50),
        ]),
        "/api/queues": _get("Forward queue of every configured destination: counts by "
                            "state, oldest pending job, paused or not."),
        "/api/destinations/{name}/pause": _post(
            "Pause forwarding to a destination (all nodes sharing the index); jobs keep "
            "queueing.", parameters=_DESTINATION),
        "/api/destinations/{name}/resume": _post("Resume forwarding to a destination.",
                                                 parameters=_DESTINATION),
        "/api/dead-letters": _get("Forward jobs that will not be retried, with the reason.", [
            _query("destination", "Only this destination."), _limit(100)]),
        "/api/dead-letters/requeue": _post(
            "Send dead-lettered jobs again: by ids, all of a destination, or all of a study.",
            {"ids": _IDS, "destination": {"type": "string"}, "study": {"type": "string"}}),
        "/api/jobs/cancel": _post("Cancel pending or dead forward jobs (recorded as "
                                  "cancelled, never sent).", {"ids": _IDS}),
        "/api/events": _get("Recent study events (FHIR and HL7) and their deliveries.", [
            _query("study", "Only this StudyInstanceUID."), _limit(50)]),
        "/api/events/requeue": _post(
            "Deliver dead-lettered events again: by delivery ids, sink or study.",
            {"ids": _IDS, "sink": {"type": "string"}, "study": {"type": "string"}}),
        "/api/orders": _get("Recent orders received over HL7 (ORM/OMI).", [_limit(50)]),
        "/api/hl7/messages": _get("Recent inbound HL7 messages and the ACK code sent.",
                                  [_limit(50)]),
        "/api/reload": _post("Re-read the configuration file. Refused (400, with the "
                             "reason) if it does not validate; the running configuration "
                             "then stays in force. The answer lists settings that need a "
                             "restart."),
    },
}
