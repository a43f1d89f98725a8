"""A client for the node's admin HTTP server, and a TCP proxy to cut a peer off."""

from __future__ import annotations

import json
import selectors
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.net import LOOPBACK, free_port

TOKEN = "test-token-0123456789"


@dataclass
class AdminClient:
    port: int
    token: str | None = TOKEN

    def request(self, method: str, path: str, body: Any = None, *,
                token: str | bool | None = True, raw: bytes | None = None,
                ) -> tuple[int, Any]:
        """(status, decoded JSON or text); *token* False sends none, a string that one."""
        data = raw if raw is not None else (
            json.dumps(body).encode() if body is not None else None)
        request = urllib.request.Request(f"http://{LOOPBACK}:{self.port}{path}", data=data,
                                         method=method)
        chosen = self.token if token is True else (token or None)
        if chosen:
            request.add_header("Authorization", f"Bearer {chosen}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, _decode(response.read(), response.headers)
        except urllib.error.HTTPError as error:
            return error.code, _decode(error.read(), error.headers)

    def get(self, path: str) -> Any:
        status, payload = self.request("GET", path)
        assert status == 200, (path, status, payload)
        return payload

    def post(self, path: str, body: Any = None) -> Any:
        status, payload = self.request("POST", path, body if body is not None else {})
        assert status == 200, (path, status, payload)
        return payload

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample as {(name, sorted labels): value}."""
        status, text = self.request("GET", "/metrics")
        assert status == 200, text
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples


def metric(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
           **labels: str) -> float:
    """One sample's value (0 when absent, as for a counter not yet incremented)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _decode(body: bytes, headers: Any) -> Any:
    if headers.get("Content-Type", "").startswith("application/json"):
        return json.loads(body)
    return body.decode("utf-8", errors="replace")


@dataclass
class TcpProxy:
    """Forwards a loopback port to *target_port*; stop() cuts every connection, as a
    stopped server would, and start() lets new connections through again."""

    target_port: int
    port: int = field(default_factory=free_port)
    _listener: socket.socket | None = None
    _connections: list[socket.socket] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((LOOPBACK, self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection((LOOPBACK, self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._connections += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        selector = selectors.DefaultSelector()
        selector.register(a, selectors.EVENT_READ, b)
        selector.register(b, selectors.EVENT_READ, a)
        try:
            while True:
                for key, _ in selector.select():
                    data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                    if not data:
                        return
                    key.data.sendall(data)
        except OSError:
            return
        finally:
            selector.close()
            for sock in (a, b):
                sock.close()

    def stop(self) -> None:
        if self._listener is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone would not
            # (the listening socket would stay open in the kernel).
            with suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        with self._lock:
            for sock in self._connections:
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._connections.clear()


@contextmanager
def tcp_proxy(target_port: int) -> Iterator[TcpProxy]:
    proxy = TcpProxy(target_port)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()
