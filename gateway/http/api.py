"""The JSON admin API: what radiology IT needs to see and fix without a shell.

Handlers are thin: they read the request, call the index or the node, and return JSON.
The API is described in ``openapi.py`` (served at ``/api/openapi.json``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import asdict
from typing import Any, Protocol

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from gateway import __version__
from gateway.http.openapi import OPENAPI
from gateway.http.server import ApiError, Request, Router
from gateway.index import admin, events, orders, queue
from gateway.index.database import describe_error, reading
from gateway.reload import ReloadOutcome


class NodeControl(Protocol):
    """What the API asks of the running node."""

    name: str
    engine: Engine

    def readiness(self) -> list[str]: ...

    def reload(self) -> ReloadOutcome: ...

    def set_paused(self, destination: str, paused: bool) -> None: ...

    def destination_names(self) -> list[str]: ...

    def uptime_seconds(self) -> float: ...


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _time(value: str | None, name: str) -> dt.datetime | None:
    if value is None:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise ApiError(400, f"{name} must be an ISO 8601 date-time") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def _ids(body: Any) -> list[int]:
    ids = body.get("ids", []) if isinstance(body, dict) else []
    if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
        raise ApiError(400, "ids must be a list of integers")
    return ids


class AdminApi:
    """The API's handlers, bound to the running node."""

    def __init__(self, node: NodeControl) -> None:
        self.node = node

    def _read(self, work: Any) -> Any:
        try:
            with reading(self.node.engine) as connection:
                return work(connection)
        except SQLAlchemyError as exc:
            raise ApiError(503, f"index database unavailable: {describe_error(exc)}") from exc

    def _write(self, work: Any) -> Any:
        try:
            with self.node.engine.begin() as connection:
                return work(connection)
        except SQLAlchemyError as exc:
            raise ApiError(503, f"index database unavailable: {describe_error(exc)}") from exc

    def healthz(self, request: Request) -> Any:
        return {"status": "alive", "node": self.node.name, "version": __version__}

    def readyz(self, request: Request) -> Any:
        problems = self.node.readiness()
        if problems:
            return 503, {"status": "not ready", "problems": problems}
        return {"status": "ready"}

    def status(self, request: Request) -> Any:
        def collect(connection: Any) -> Any:
            since = _now() - dt.timedelta(minutes=5)
            return {
                "node": self.node.name,
                "version": __version__,
                "uptime_seconds": round(self.node.uptime_seconds()),
                "received_last_5_minutes": admin.received_since(connection, since),
                "spool_backlog": admin.spool_backlog(connection),
                "unrouted": queue.unrouted_count(connection),
                "open_associations": admin.open_associations(connection),
            }
        return self._read(collect)

    def associations(self, request: Request) -> Any:
        return self._read(lambda c: admin.associations(
            c, calling_ae=request.arg("calling_ae"), outcome=request.arg("outcome"),
            since=_time(request.arg("since"), "since"), until=_time(request.arg("until"), "until"),
            limit=request.number("limit", 100),
        ))

    def studies(self, request: Request) -> Any:
        found = self._read(lambda c: admin.studies(
            c, patient_id=request.arg("patient_id"),
            accession_number=request.arg("accession_number"),
            study_date=request.arg("study_date"), modality=request.arg("modality"),
            limit=request.number("limit", 50),
        ))
        return [asdict(view) for view in found]

    def queues(self, request: Request) -> Any:
        def collect(connection: Any) -> Any:
            rows = {row.destination: row for row in queue.queue_status(connection)}
            paused = admin.paused_destinations(connection)
            return [
                {"destination": name, "paused": name in paused,
                 **_queue_fields(rows.get(name))}
                for name in self.node.destination_names()
            ]
        return self._read(collect)

    def pause(self, request: Request) -> Any:
        return self._set_paused(request, paused=True)

    def resume(self, request: Request) -> Any:
        return self._set_paused(request, paused=False)

    def _set_paused(self, request: Request, *, paused: bool) -> Any:
        name = request.params["name"]
        if name not in self.node.destination_names():
            raise ApiError(404, f"no destination named {name!r}")
        try:
            self.node.set_paused(name, paused)
        except SQLAlchemyError as exc:
            raise ApiError(503, f"index database unavailable: {describe_error(exc)}") from exc
        return {"destination": name, "paused": paused}

    def dead_letters(self, request: Request) -> Any:
        letters = self._read(lambda c: queue.dead_letters(
            c, request.arg("destination"), limit=request.number("limit", 100)))
        return [asdict(letter) for letter in letters]

    def requeue(self, request: Request) -> Any:
        body = request.body if isinstance(request.body, dict) else {}
        ids, destination, study = _ids(body), body.get("destination"), body.get("study")
        if not (ids or destination or study):
            raise ApiError(400, "give ids, destination or study")
        count = self._write(lambda c: queue.requeue(
            c, _now(), job_ids=ids, destination=destination, study_instance_uid=study))
        return {"requeued": count}

    def cancel(self, request: Request) -> Any:
        ids = _ids(request.body)
        if not ids:
            raise ApiError(400, "give the ids of the jobs to cancel")
        return {"cancelled": self._write(lambda c: admin.cancel_jobs(c, ids, _now()))}

    def recent_events(self, request: Request) -> Any:
        found = self._read(lambda c: events.recent_events(
            c, request.number("limit", 50), request.arg("study")))
        return [asdict(event) for event in found]

    def requeue_events(self, request: Request) -> Any:
        body = request.body if isinstance(request.body, dict) else {}
        ids, sink, study = _ids(body), body.get("sink"), body.get("study")
        if not (ids or sink or study):
            raise ApiError(400, "give ids, sink or study")
        count = self._write(lambda c: events.requeue_deliveries(
            c, _now(), ids=ids, sink=sink, study_instance_uid=study))
        return {"requeued": count}

    def recent_orders(self, request: Request) -> Any:
        return [asdict(order) for order in
                self._read(lambda c: orders.recent_orders(c, request.number("limit", 50)))]

    def hl7_messages(self, request: Request) -> Any:
        rows = self._read(lambda c: orders.recent_messages(c, request.number("limit", 50)))
        return [dict(row._mapping) for row in rows]

    def reload(self, request: Request) -> Any:
        outcome = self.node.reload()
        if not outcome.applied:
            return 400, {"reloaded": False, "problems": outcome.problems}
        return {"reloaded": True, "restart_required": outcome.restart_required}

    def openapi(self, request: Request) -> Any:
        return OPENAPI


def build_router(node: NodeControl, public: Iterable[str] = ("healthz", "readyz")) -> Router:
    """All API routes, bound to *node*; the endpoints named in *public* need no token."""
    api = AdminApi(node)
    open_to_all = set(public)
    router = Router()
    router.add("GET", "/healthz", api.healthz, protected="healthz" not in open_to_all)
    router.add("GET", "/readyz", api.readyz, protected="readyz" not in open_to_all)
    router.add("GET", "/api/openapi.json", api.openapi, protected=False)
    for method, path, handler in (
        ("GET", "/api/status", api.status),
        ("GET", "/api/associations", api.associations),
        ("GET", "/api/studies", api.studies),
        ("GET", "/api/queues", api.queues),
        ("POST", "/api/destinations/{name}/pause", api.pause),
        ("POST", "/api/destinations/{name}/resume", api.resume),
        ("GET", "/api/dead-letters", api.dead_letters),
        ("POST", "/api/dead-letters/requeue", api.requeue),
        ("POST", "/api/jobs/cancel", api.cancel),
        ("GET", "/api/events", api.recent_events),
        ("POST", "/api/events/requeue", api.requeue_events),
        ("GET", "/api/orders", api.recent_orders),
        ("GET", "/api/hl7/messages", api.hl7_messages),
        ("POST", "/api/reload", api.reload),
    ):
        router.add(method, path, handler)
    return router


def _queue_fields(row: Any) -> dict[str, Any]:
    if row is None:
        return {"pending": 0, "in_flight": 0, "retrying": 0, "dead": 0, "done": 0,
                "oldest_pending": None}
    return {"pending": row.pending, "in_flight": row.in_flight, "retrying": row.retrying,
            "dead": row.dead, "done": row.done,
            "oldest_pending": row.oldest_pending.isoformat() if row.oldest_pending else None}
