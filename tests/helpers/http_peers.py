"""HTTP peers for event sinks: a FHIR server with conditional-update semantics and a
webhook receiver that checks signatures."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

from tests.helpers.net import LOOPBACK


@dataclass
class FhirServer:
    """Keeps resources by type; a conditional PUT updates the one match or creates."""

    port: int = 0
    available: bool = True
    resources: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    requests: int = 0
    authorizations: list[str | None] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/fhir"

    def matches(self, kind: str, system: str, value: str) -> list[dict[str, Any]]:
        return [
            r for r in self.resources.get(kind, [])
            if any(i.get("system") == system and i.get("value") == value
                   for i in r.get("identifier", []))
        ]

    def transaction(self, bundle: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        responses = []
        with self.lock:
            for entry in bundle.get("entry", []):
                kind, _, query = entry["request"]["url"].partition("?")
                system, _, value = unquote(query.removeprefix("identifier=")).partition("|")
                found = self.matches(kind, system, value)
                if len(found) > 1:
                    return 412, {"resourceType": "OperationOutcome"}
                resource = dict(entry["resource"])
                if found:
                    version = int(found[0]["meta"]["versionId"]) + 1
                    resource["id"] = found[0]["id"]
                    resource["meta"] = {"versionId": str(version)}
                    self.resources[kind][self.resources[kind].index(found[0])] = resource
                    responses.append({"response": {"status": "200 OK"}})
                else:
                    resource["id"] = f"{kind.lower()}-{sum(map(len, self.resources.values())) + 1}"
                    resource["meta"] = {"versionId": "1"}
                    self.resources.setdefault(kind, []).append(resource)
                    responses.append({"response": {"status": "201 Created"}})
        return 200, {"resourceType": "Bundle", "type": "transaction-response", "entry": responses}


@dataclass
class WebhookReceiver:
    secret: bytes
    port: int = 0
    status: int = 200
    deliveries: list[dict[str, Any]] = field(default_factory=list)
    bad_signatures: int = 0

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/events"


def _serve(handler: type[BaseHTTPRequestHandler]) -> tuple[ThreadingHTTPServer, threading.Thread]:
    server = ThreadingHTTPServer((LOOPBACK, 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


@contextmanager
def fhir_server() -> Iterator[FhirServer]:
    state = FhirServer()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            return None

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            state.requests += 1
            state.authorizations.append(self.headers.get("Authorization"))
            if not state.available:
                self._reply(503, {"resourceType": "OperationOutcome"})
                return
            status, reply = state.transaction(json.loads(body))
            self._reply(status, reply)

        def _reply(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/fhir+json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server, _ = _serve(Handler)
    state.port = int(server.server_address[1])
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def webhook_receiver(secret: bytes) -> Iterator[WebhookReceiver]:
    state = WebhookReceiver(secret)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            return None

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            expected = "sha256=" + hmac.new(state.secret, body, hashlib.sha256).hexdigest()
            signature = self.headers.get("X-Dicom-Gateway-Signature", "")
            status = state.status
            if not hmac.compare_digest(expected, signature):
                state.bad_signatures += 1
                status = 401 if status == 200 else status
            elif status == 200:
                state.deliveries.append({"headers": dict(self.headers), "body": json.loads(body)})
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server, _ = _serve(Handler)
    state.port = int(server.server_address[1])
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
