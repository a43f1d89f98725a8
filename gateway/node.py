"""The running node: wires configuration, index, spool, object store, uploader and listener.

Start-up recovery runs before the listener opens, so every instance acknowledged by a
previous run is accounted for before new ones arrive.
"""

from __future__ import annotations

import datetime as dt
import signal
import threading
import uuid
from pathlib import Path
from types import FrameType

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from gateway import systemd
from gateway.acceptance import AcceptancePolicy
from gateway.config import GatewayConfig
from gateway.index import repository
from gateway.index.database import describe_error, make_engine, migrate
from gateway.ingest import Ingestor
from gateway.logs import get_logger
from gateway.objectstore import ObjectStore, ObjectStoreError, open_object_store
from gateway.receiver import Receiver
from gateway.spool import Spool
from gateway.uploader import Uploader

log = get_logger(__name__)


class StartupError(Exception):
    """The node cannot start; the message says what to fix."""


def node_identity(spool_dir: Path) -> str:
    """A stable identity for this node's spool, created on first start.

    Rows in a shared database record which spool holds them, so each node uploads only
    its own files. It lives with the spool (not the host name), so it survives
    container re-creation and host renames.
    """
    spool_dir.mkdir(parents=True, exist_ok=True)
    path = spool_dir / "node-id"
    try:
        return path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        identity = f"node-{uuid.uuid4().hex[:12]}"
        path.write_text(identity + "\n", encoding="ascii")
        return identity


class Node:
    """One gateway process."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.name = node_identity(config.storage.spool_dir)
        self.engine: Engine = make_engine(
            config.storage.database, timeout=config.storage.database_timeout
        )
        self.spool = Spool(config.storage.spool_dir, config.storage.min_free_bytes)
        self.store: ObjectStore = open_object_store(config.storage)
        self.uploader = Uploader(
            self.engine,
            self.spool,
            self.store,
            self.name,
            workers=config.storage.upload_workers,
            retry=config.storage.upload_retry,
        )
        self.ingestor = Ingestor(self.engine, self.spool, self.name, on_stored=self.uploader.wake)
        policy = AcceptancePolicy.build(
            config.node.ae_title, config.node.accept_unknown_calling_ae, config.calling_ae
        )
        self.receiver = Receiver(config.node, policy, self.ingestor, self.engine, self.name)
        self._stop_requested = threading.Event()
        self._stopped = False

    def start(self) -> None:
        """Migrate, recover, then start uploading and listening."""
        try:
            migrate(self.engine)
        except SQLAlchemyError as exc:
            raise StartupError(f"index database unavailable: {describe_error(exc)}") from exc
        try:
            self.store.check()
        except ObjectStoreError as exc:
            log.warning("object_store_unavailable_at_start", error=str(exc))
        self.recover()
        self.uploader.start()
        try:
            self.receiver.start()
        except OSError as exc:
            self.uploader.stop()
            address = f"{self.config.node.host}:{self.config.node.port}"
            raise StartupError(f"cannot listen on {address}: {exc.strerror}") from exc
        systemd.notify("READY=1")
        log.info("node_started", node=self.name, store=self.store.description)

    def recover(self) -> None:
        """Account for a previous run that stopped abruptly (kill -9, power loss)."""
        partial = self.spool.clear_incoming()
        now = dt.datetime.now(dt.UTC)
        with self.engine.begin() as connection:
            interrupted = repository.mark_interrupted_associations(connection, self.name, now)
            referenced = repository.spooled_names(connection, self.name)
        on_disk = self.spool.ready_names()
        # In ready/ but not in the index: the commit never happened, so it was never
        # acknowledged; the sender still has it and will send it again.
        orphans = on_disk - referenced
        for name in orphans:
            self.spool.discard(name)
        missing = referenced - on_disk
        if missing:
            log.critical("spool_files_missing", count=len(missing))
        log.info(
            "recovery_done",
            partial_receptions_removed=partial,
            unacknowledged_spool_files_removed=len(orphans),
            interrupted_associations=interrupted,
            pending_uploads=len(referenced),
        )

    def stop(self) -> None:
        """Graceful stop: no new associations, in-flight ones finish, uploads finish."""
        if self._stopped:
            return
        self._stopped = True
        systemd.notify("STOPPING=1")
        log.info("node_stopping")
        self.receiver.stop(self.config.node.stop_timeout)
        self.uploader.stop()
        self.engine.dispose()
        self.spool.close()
        log.info("node_stopped")

    def request_stop(self, signum: int | None = None, _frame: FrameType | None = None) -> None:
        if signum is not None:
            log.info("signal_received", signal=signal.Signals(signum).name)
        self._stop_requested.set()

    def run(self) -> None:
        """Run in the foreground until SIGTERM or SIGINT."""
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        try:
            self.start()
        except StartupError:
            self.engine.dispose()
            raise
        try:
            while not self._stop_requested.wait(1.0):
                pass
        finally:
            self.stop()
