"""The MLLP listener: HL7 orders and patient updates in, ACKs out.

Every message gets an ACK: AA when applied, AE when it could not be processed (the
sender should retry or fix it), AR when it is not something the gateway takes. Bytes
that are not MLLP frames, and messages over the size limit, close the connection. One
bad peer never stops the listener.
"""

from __future__ import annotations

import datetime as dt
import socket
import socketserver
import threading
from collections.abc import Callable

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from gateway.config import Hl7Config
from gateway.hl7 import messages
from gateway.hl7.messages import END_BLOCK, START_BLOCK, Hl7MessageError, Inbound
from gateway.index import orders
from gateway.index.database import describe_error
from gateway.logs import failure_fields, get_logger
from gateway.metrics import Metrics

log = get_logger(__name__)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class FramingError(Exception):
    """The peer does not speak MLLP (or sent more than we accept)."""


def read_frame(sock: socket.socket, buffer: bytearray, limit: int) -> bytes | None:
    """The next MLLP frame's content, or None when the peer closed the connection."""
    while True:
        start = buffer.find(START_BLOCK)
        if start > 0 and buffer[:start].strip():
            raise FramingError("bytes outside an MLLP frame")
        if start >= 0:
            end = buffer.find(END_BLOCK, start + 1)
            if end - start > limit:
                raise FramingError(f"message longer than {limit} bytes")
            if end >= 0:
                content = bytes(buffer[start + 1 : end])
                del buffer[: end + len(END_BLOCK)]
                return content
        elif buffer.strip():
            raise FramingError("data that does not start with an MLLP start block")
        if len(buffer) > limit:
            raise FramingError(f"message longer than {limit} bytes")
        chunk = sock.recv(65536)
        if not chunk:
            if buffer.strip():
                raise FramingError("connection closed inside a message")
            return None
        buffer += chunk


def decode(content: bytes) -> str:
    try:
        return content.decode("utf-8")
    except UnicodeDecodeError:
        return content.decode("latin-1")


class Hl7Processor:
    """Applies inbound messages to the index and answers with an ACK."""

    def __init__(
        self, engine: Engine, config: Hl7Config,
        on_order: Callable[[list[int]], None] = lambda studies: None,
        clock: Callable[[], dt.datetime] = _utcnow,
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics or Metrics()
        self.engine = engine
        self.config = config
        self.on_order = on_order
        self.clock = clock

    def handle(self, text: str, peer: str) -> str:
        inbound: Inbound | None = None
        header = messages.read_header(text)
        try:
            inbound = messages.parse(text)
            detail = self._apply(inbound)
            code, error_code = "AA", None
        except Hl7MessageError as exc:
            code, detail, error_code = exc.code, exc.text, exc.error_code
        except SQLAlchemyError as exc:
            code, detail, error_code = "AE", "the index database is unavailable", "207"
            log.error("hl7_index_write_failed", error=describe_error(exc))
        except Exception as exc:  # noqa: BLE001 - answered AE, logged without the message
            log.error("hl7_internal_error", **failure_fields(exc))
            code, detail, error_code = "AE", "internal error", "207"
        message_type = header.message_type or None
        control_id = header.control_id or None
        self.metrics.hl7_messages.labels(message_type or "unknown", code).inc()
        level = log.info if code == "AA" else log.warning
        level("hl7_message", message_type=message_type, control_id=control_id, ack=code,
              detail=detail, peer_address=peer)
        self._log(peer, message_type, control_id, code, detail)
        return messages.ack(
            inbound or header, code, detail or "message accepted",
            application=self.config.sending_application,
            facility=self.config.sending_facility, error_code=error_code,
        )

    def _log(self, peer: str, message_type: str | None, control_id: str | None, code: str,
             detail: str | None) -> None:
        try:
            with self.engine.begin() as connection:
                orders.log_message(connection, peer_address=peer, message_type=message_type,
                                   control_id=control_id, ack_code=code, detail=detail,
                                   now=self.clock())
        except SQLAlchemyError as exc:
            log.error("hl7_log_write_failed", error=describe_error(exc))

    def _apply(self, inbound: Inbound) -> str:
        now = self.clock()
        kind = inbound.message_type
        if kind in messages.ORDER_TYPES:
            order = messages.order_from(inbound)
            with self.engine.begin() as connection:
                orders.upsert_order(connection, order, kind, inbound.control_id, now)
                studies = (orders.studies_with_accession(connection, order.accession_number)
                           if order.accession_number else [])
                for study_pk in studies:
                    self._reconciled(orders.reconcile_study(connection, study_pk))
            self.on_order(studies)
            return f"order {order.order_key} recorded"
        if kind == messages.PATIENT_UPDATE:
            patient = messages.patient_update_from(inbound)
            with self.engine.begin() as connection:
                count = orders.update_patient(connection, patient, now)
            return f"{count} patient record(s) updated"
        if kind == messages.PATIENT_MERGE:
            surviving, prior = messages.merge_from(inbound)
            with self.engine.begin() as connection:
                moved = orders.merge_patients(connection, surviving, prior, now)
            return f"merged; {moved} study(ies) moved"
        raise Hl7MessageError("AR", "200", f"message type {kind or '(none)'} is not supported")

    def _reconciled(self, result: orders.Reconciliation | None) -> None:
        if result and result.newly_flagged:
            self.metrics.demographics_mismatches.inc()
        if result and result.mismatched:
            log.warning("order_demographics_mismatch", study_pk=result.study_pk,
                        order_pk=result.order_pk, attributes=result.mismatched)


MAX_CONNECTIONS = 64


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        peer = str(self.client_address[0])
        if not self.server.slots.acquire(blocking=False):
            log.warning("hl7_connection_refused", reason="too many connections",
                        peer_address=peer)
            return
        try:
            self._serve(peer)
        finally:
            self.server.slots.release()

    def _serve(self, peer: str) -> None:
        sock: socket.socket = self.request
        sock.settimeout(self.server.config.timeout)
        buffer = bytearray()
        try:
            while True:
                content = read_frame(sock, buffer, self.server.config.max_message_bytes)
                if content is None:
                    return
                reply = self.server.processor.handle(decode(content), peer)
                sock.sendall(messages.frame(reply))
        except FramingError as exc:
            log.warning("hl7_connection_closed", reason=str(exc), peer_address=peer)
        except TimeoutError:
            log.warning("hl7_connection_closed", reason="idle timeout", peer_address=peer)
        except OSError as exc:
            log.info("hl7_connection_lost", reason=str(exc), peer_address=peer)


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, address: tuple[str, int], processor: Hl7Processor,
                 config: Hl7Config) -> None:
        self.processor = processor
        self.config = config
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, _Handler)


class Hl7Listener:
    """The MLLP server thread."""

    def __init__(self, processor: Hl7Processor, config: Hl7Config) -> None:
        self.processor = processor
        self.config = config
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1]) if self._server else 0

    def start(self) -> None:
        port = self.config.listen_port or 0
        self._server = _Server((self.config.host, port), self.processor, self.config)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="hl7-listener", daemon=True
        )
        self._thread.start()
        log.info("hl7_listening", host=self.config.host, port=self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

