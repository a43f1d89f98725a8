"""Where study events go: a JSON-lines file, a FHIR server, a webhook, NATS JetStream,
or (for HL7 events) an MLLP receiver.

Each sink delivers one event at a time and raises :class:`TransientDeliveryError` (try
again later) or :class:`PermanentDeliveryError` (dead letter) when it cannot.
Deliveries are idempotent at the receiver: the FHIR sink uses conditional updates, NATS
de-duplicates on the message id, webhooks and files carry the event id.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Protocol

from gateway.config import EventSinkConfig, Hl7DestinationConfig
from gateway.hl7 import messages
from gateway.hl7.listener import FramingError, decode, read_frame
from gateway.index.events import ClaimedDelivery

SIGNATURE_HEADER = "X-Dicom-Gateway-Signature"
EVENT_HEADER = "X-Dicom-Gateway-Event"


class DeliveryError(Exception):
    """A failed delivery. ``str()`` is the log-safe summary; ``detail`` adds what the
    receiver said (which may quote the event's data) and is kept in the database only."""

    def __init__(self, summary: str, detail: str = "") -> None:
        super().__init__(summary)
        self.detail = detail

    def full(self) -> str:
        return f"{self}: {self.detail}" if self.detail else str(self)


class TransientDeliveryError(DeliveryError):
    """The receiver could not take the event now."""


class PermanentDeliveryError(DeliveryError):
    """The receiver will never take this event as it is."""


class Sink(Protocol):
    name: str

    def deliver(self, delivery: ClaimedDelivery) -> None: ...

    def close(self) -> None: ...


class FileSink:
    """Appends one JSON object per line and fsyncs it (the embedded default)."""

    def __init__(self, config: EventSinkConfig) -> None:
        self.name = config.name
        self.path = Path(str(config.path))
        self._lock = threading.Lock()

    def deliver(self, delivery: ClaimedDelivery) -> None:
        line = json.dumps(json.loads(delivery.payload), separators=(",", ":")) + "\n"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._lock, self.path.open("a", encoding="utf-8") as stream:
                stream.write(line)
                stream.flush()
                os.fsync(stream.fileno())
        except OSError as exc:
            raise TransientDeliveryError(f"cannot append to {self.path}: {exc.strerror}") from exc

    def close(self) -> None:
        return None


def _http(request: urllib.request.Request, timeout: float) -> bytes:
    """Send a request; map HTTP and network failures to transient/permanent errors."""
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - configured URL
            return bytes(response.read())
    except urllib.error.HTTPError as exc:
        body = exc.read()[:500].decode("utf-8", "replace")
        if exc.code in (408, 425, 429) or exc.code >= 500 or exc.code in (401, 403):
            # Overload, server trouble, or credentials an operator will fix: try again.
            raise TransientDeliveryError(f"HTTP {exc.code}", body) from exc
        raise PermanentDeliveryError(f"HTTP {exc.code}", body) from exc
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise TransientDeliveryError(f"cannot reach {request.full_url}: {exc}") from exc


class WebhookSink:
    """POSTs the event JSON, signed with HMAC-SHA256 of the body."""

    def __init__(self, config: EventSinkConfig) -> None:
        self.name = config.name
        self.url = str(config.url)
        self.timeout = config.timeout
        self.secret = os.environ.get(str(config.secret_env), "").encode()

    def deliver(self, delivery: ClaimedDelivery) -> None:
        if not self.secret:
            raise TransientDeliveryError("the webhook signing secret is not set in the environment")
        body = delivery.payload.encode("utf-8")
        signature = hmac.new(self.secret, body, hashlib.sha256).hexdigest()
        request = urllib.request.Request(  # noqa: S310 - configured URL
            self.url, data=body, method="POST",
            headers={"Content-Type": "application/json", EVENT_HEADER: delivery.event_id,
                     SIGNATURE_HEADER: f"sha256={signature}"},
        )
        _http(request, self.timeout)

    def close(self) -> None:
        return None


def conditional_bundle(resource: dict[str, Any]) -> dict[str, Any]:
    """A transaction Bundle that creates or updates the resource by its DICOM UID, so a
    replayed event never creates a second resource."""
    identifier = next(
        (i for i in resource.get("identifier", []) if i.get("system") == "urn:dicom:uid"), None
    )
    if identifier is None:
        raise PermanentDeliveryError("the resource has no urn:dicom:uid identifier")
    search = f"identifier={identifier['system']}|{identifier['value']}"
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{
            "resource": resource,
            "request": {"method": "PUT", "url": f"{resource['resourceType']}?{search}"},
        }],
    }


class FhirSink:
    """Conditional update of each resource on a FHIR server, in a transaction Bundle."""

    def __init__(self, config: EventSinkConfig) -> None:
        self.name = config.name
        self.url = str(config.url).rstrip("/")
        self.timeout = config.timeout
        self.token_env = config.token_env

    def deliver(self, delivery: ClaimedDelivery) -> None:
        envelope = json.loads(delivery.payload)
        body = json.dumps(conditional_bundle(envelope["resource"])).encode("utf-8")
        headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
        if self.token_env:
            token = os.environ.get(self.token_env, "")
            if not token:
                raise TransientDeliveryError(f"the bearer token ({self.token_env}) is not set")
            headers["Authorization"] = f"Bearer {token}"
        request = urllib.request.Request(  # noqa: S310 - configured URL
            self.url, data=body, method="POST", headers=headers
        )
        reply = _http(request, self.timeout)
        try:
            status = str(json.loads(reply)["entry"][0]["response"]["status"])
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            message = "the FHIR server's reply is not a transaction-response"
            raise TransientDeliveryError(message, reply[:500].decode("utf-8", "replace")) from exc
        if not status.startswith("2"):
            raise PermanentDeliveryError(f"the FHIR server answered {status[:40]}")

    def close(self) -> None:
        return None


class NatsSink:
    """Publishes to a JetStream subject with the event id as ``Nats-Msg-Id``."""

    def __init__(self, config: EventSinkConfig) -> None:
        self.name = config.name
        self.config = config
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"nats-{self.name}",
                                        daemon=True)
        self._thread.start()
        self._client: Any = None
        self._jetstream: Any = None

    def _run(self, coroutine: Any) -> Any:
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(self.config.timeout + 5)
        except TimeoutError:
            future.cancel()  # a publish that lands after we gave up would be unaccounted
            raise

    async def _connect(self) -> None:
        import nats
        from nats.js.errors import NotFoundError

        if self._client is not None and self._client.is_connected:
            return
        self._client = await nats.connect(
            servers=list(self.config.servers), connect_timeout=self.config.timeout,
            max_reconnect_attempts=0, allow_reconnect=False,
        )
        self._jetstream = self._client.jetstream(timeout=self.config.timeout)
        try:
            await self._jetstream.stream_info(self.config.stream)
        except NotFoundError:
            await self._jetstream.add_stream(
                name=self.config.stream, subjects=[self.config.subject]
            )

    async def _publish(self, delivery: ClaimedDelivery) -> None:
        await self._connect()
        await self._jetstream.publish(
            str(self.config.subject), delivery.payload.encode("utf-8"),
            timeout=self.config.timeout, headers={"Nats-Msg-Id": delivery.event_id},
        )

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):  # closing a broken connection
                await client.close()

    async def _shutdown(self) -> None:
        await self._drop_client()
        current = asyncio.current_task()
        pending = [task for task in asyncio.all_tasks() if task is not current]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def deliver(self, delivery: ClaimedDelivery) -> None:
        try:
            self._run(self._publish(delivery))
        except Exception as exc:
            with contextlib.suppress(Exception):
                self._run(self._drop_client())  # reconnect next time
            message = f"NATS publish failed: {type(exc).__name__}: {exc}"
            raise TransientDeliveryError(message) from exc

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._run(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


class MllpSink:
    """Sends an HL7 message to an MLLP receiver and reads its ACK.

    AA/CA: delivered. AE/CE (application error) and network trouble: retried.
    AR/CR (rejected): dead letter, the receiver will not take it.
    """

    def __init__(self, config: Hl7DestinationConfig, max_bytes: int = 1024 * 1024) -> None:
        self.name = config.name
        self.config = config
        self.max_bytes = max_bytes

    def deliver(self, delivery: ClaimedDelivery) -> None:
        where = f"{self.config.host}:{self.config.port}"
        try:
            with socket.create_connection((self.config.host, self.config.port),
                                          timeout=self.config.timeout) as sock:
                sock.sendall(messages.frame(delivery.payload))
                reply = read_frame(sock, bytearray(), self.max_bytes)
        except (OSError, FramingError) as exc:
            raise TransientDeliveryError(f"MLLP exchange with {where} failed: {exc}") from exc
        if reply is None:
            raise TransientDeliveryError(f"{where} closed the connection without an ACK")
        code = messages.ack_code(decode(reply))
        if code in ("AA", "CA"):
            return
        if code in ("AR", "CR"):
            raise PermanentDeliveryError(f"{where} rejected the message ({code})")
        raise TransientDeliveryError(f"{where} answered {code or 'something that is not an ACK'}")

    def close(self) -> None:
        return None


def open_sink(config: EventSinkConfig) -> Sink:
    kinds: dict[str, type[FileSink | FhirSink | WebhookSink | NatsSink]] = {
        "file": FileSink, "fhir": FhirSink, "webhook": WebhookSink, "nats": NatsSink,
    }
    return kinds[config.type](config)
