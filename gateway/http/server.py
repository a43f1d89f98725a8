"""The admin HTTP server: health, readiness, Prometheus metrics, the JSON API, the dashboard.

A small threaded server from the standard library; no framework, no front-end build.
Everything under ``/api`` (and ``/metrics`` unless made public) needs
``Authorization: Bearer <token>``; tokens are compared in constant time.
"""

from __future__ import annotations

import hmac
import json
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST

from gateway.config import HttpConfig
from gateway.logs import failure_fields, get_logger
from gateway.metrics import Metrics

log = get_logger(__name__)

TOKEN_ENV = "DICOM_GATEWAY_API_TOKEN"  # noqa: S105 - the variable's name, not a secret
STATIC = Path(__file__).parent / "static"
_STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".png": "image/png"}


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    body: Any
    params: dict[str, str]

    def arg(self, name: str) -> str | None:
        value = self.query.get(name)
        return value if value not in (None, "") else None

    def number(self, name: str, default: int, maximum: int = 1000) -> int:
        raw = self.arg(name)
        if raw is None:
            return default
        if not raw.isdigit():
            raise ApiError(400, f"{name} must be a whole number")
        return min(int(raw), maximum)


Handler = Callable[[Request], Any]


class Router:
    def __init__(self) -> None:
        self.routes: list[tuple[str, re.Pattern[str], Handler, bool]] = []

    def add(self, method: str, pattern: str, handler: Handler, *, protected: bool = True) -> None:
        regex = re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern) + "$")
        self.routes.append((method, regex, handler, protected))

    def match(self, method: str, path: str) -> tuple[Handler, dict[str, str], bool] | None:
        allowed = False
        for route_method, regex, handler, protected in self.routes:
            found = regex.match(path)
            if found:
                if route_method == method:
                    return handler, found.groupdict(), protected
                allowed = True
        if allowed:
            raise ApiError(405, "method not allowed")
        return None


def load_token(config: HttpConfig) -> str | None:
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token and config.token_file is not None:
        try:
            token = config.token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            log.error("api_token_file_unreadable", path=str(config.token_file),
                      error=exc.strerror)
    return token or None


class AdminServer:
    def __init__(self, config: HttpConfig, router: Router, metrics: Metrics) -> None:
        self.config = config
        self.router = router
        self.metrics = metrics
        self.token = load_token(config)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._add_builtin_routes()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1]) if self._server else 0

    def _add_builtin_routes(self) -> None:
        public = set(self.config.public)
        self.router.add("GET", "/metrics", self._metrics, protected="metrics" not in public)
        for name in ("index.html", "app.js", "style.css"):
            self.router.add("GET", f"/static/{name}", self._static(name),
                            protected="dashboard" not in public)
        self.router.add("GET", "/", self._static("index.html"),
                        protected="dashboard" not in public)
        self.router.add("GET", "/favicon.ico",
                        lambda request: RawResponse(b"", "image/x-icon", 204), protected=False)

    def _metrics(self, request: Request) -> Any:
        return RawResponse(self.metrics.exposition(), CONTENT_TYPE_LATEST)

    @staticmethod
    def _static(name: str) -> Handler:
        def serve(request: Request) -> Any:
            path = STATIC / name
            return RawResponse(path.read_bytes(), _STATIC_TYPES[path.suffix])

        return serve

    def authorized(self, header: str | None) -> bool:
        if self.token is None or not header or not header.startswith("Bearer "):
            return False
        return hmac.compare_digest(header[7:].strip().encode(), self.token.encode())

    def start(self) -> None:
        server = ThreadingHTTPServer((self.config.host, self.config.port or 0), _handler(self))
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="admin-http",
                                        daemon=True)
        self._thread.start()
        if self.token is None:
            log.warning("api_token_missing", hint=f"set {TOKEN_ENV} or [http] token_file; "
                        "the API answers 503 until then")
        log.info("http_listening", host=self.config.host, port=self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


@dataclass(frozen=True)
class RawResponse:
    body: bytes
    content_type: str
    status: int = 200


def _handler(admin: AdminServer) -> type[BaseHTTPRequestHandler]:
    class RequestHandler(BaseHTTPRequestHandler):
        server_version = "dicom-gateway"
        sys_version = ""

        def log_message(self, format: str, *args: Any) -> None:
            return None  # requests are summarised in our own log line

        def do_GET(self) -> None:
            self._dispatch("GET")

        def do_POST(self) -> None:
            self._dispatch("POST")

        def _dispatch(self, method: str) -> None:
            url = urlsplit(self.path)
            try:
                handler, params = self._route(method, url.path)
                request = Request(method, url.path, _query(url.query), self._body(method),
                                  params)
                result = handler(request)
            except ApiError as exc:
                self._json(exc.status, {"error": exc.message})
                return
            except Exception as exc:  # noqa: BLE001 - the server keeps serving
                log.error("http_internal_error", path=url.path, **failure_fields(exc))
                self._json(500, {"error": "internal error, see the node's log"})
                return
            if isinstance(result, RawResponse):
                self._send(result.status, result.body, result.content_type)
            elif isinstance(result, tuple):
                self._json(result[0], result[1])
            else:
                self._json(200, result)

        def _route(self, method: str, path: str) -> tuple[Handler, dict[str, str]]:
            found = admin.router.match(method, path)
            if found is None:
                raise ApiError(404, "not found")
            handler, params, protected = found
            if protected:
                if admin.token is None:
                    raise ApiError(503, f"no API token is configured ({TOKEN_ENV})")
                if not admin.authorized(self.headers.get("Authorization")):
                    raise ApiError(401, "a valid bearer token is required")
            return handler, params

        def _body(self, method: str) -> Any:
            if method != "POST":
                return None
            length = int(self.headers.get("Content-Length") or 0)
            if length > 1024 * 1024:
                raise ApiError(413, "request body too large")
            raw = self.rfile.read(length) if length else b""
            if not raw:
                return {}
            try:
                return json.loads(raw)
            except ValueError:
                raise ApiError(400, "the body is not JSON") from None

        def _json(self, status: int, payload: Any) -> None:
            body = json.dumps(payload, default=str).encode("utf-8")
            self._send(status, body, "application/json")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Content-Security-Policy", "default-src 'self'")
            self.end_headers()
            self.wfile.write(body)

    return RequestHandler


def _query(text: str) -> dict[str, str]:
    return {key: values[-1] for key, values in parse_qs(text).items()}
