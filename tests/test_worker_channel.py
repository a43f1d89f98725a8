"""The channel between the listener and the worker: one failing message does not end
it, and wake-ups are merged."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path
from typing import Any

from structlog.testing import capture_logs

from gateway.metrics import Metrics
from gateway.worker_process import (
    NOTIFY_INTERVAL_SECONDS,
    ChannelClosedError,
    WorkerProcess,
    _Worker,
    receive_message,
    send_message,
)
from tests.helpers.nodes import make_config


class _Background:
    """Stands in for the worker's background work; its pause refresh fails once, as
    when the index is unreachable."""

    def __init__(self) -> None:
        self.uploads = 0
        self.refreshes = 0
        self.ended = 0

    def wake_upload(self) -> None:
        self.uploads += 1

    def wake_forward(self, _destinations: Any) -> None:
        pass

    def association_ended(self, _destinations: Any) -> None:
        self.ended += 1

    def refresh_paused(self) -> None:
        self.refreshes += 1
        if self.refreshes == 1:
            raise RuntimeError("index database unavailable")


def test_a_failing_message_is_logged_and_the_worker_keeps_reading() -> None:
    listener, worker_end = socket.socketpair()
    worker = _Worker(worker_end)
    background = _Background()
    with capture_logs() as logs:
        reader = threading.Thread(target=worker._read, args=(background,))
        reader.start()
        for message in ({"op": "refresh_paused"}, {"op": "stored", "destinations": []},
                        {"op": "association_ended", "destinations": ["pacs"]},
                        {"op": "refresh_paused"}, {"op": "stop"}):
            send_message(listener, message)
        reader.join(10)
    assert not reader.is_alive()
    assert worker.stop_requested.is_set()
    assert (background.refreshes, background.uploads, background.ended) == (2, 1, 1)
    failed = [entry for entry in logs if entry["event"] == "worker_message_failed"]
    assert len(failed) == 1 and failed[0]["op"] == "refresh_paused"
    listener.close()
    worker_end.close()


def test_the_worker_stops_when_the_listener_is_gone() -> None:
    listener, worker_end = socket.socketpair()
    worker = _Worker(worker_end)
    reader = threading.Thread(target=worker._read, args=(_Background(),))
    reader.start()
    listener.close()
    reader.join(10)
    assert worker.stop_requested.is_set()
    worker_end.close()


def test_a_message_split_across_reads_arrives_whole() -> None:
    left, right = socket.socketpair()
    left.settimeout(0.05)
    payload = {"op": "metrics", "id": 3, "pad": "x" * 100_000}
    sender = threading.Thread(target=send_message, args=(right, payload))
    sender.start()
    assert receive_message(left, patient=True) == payload
    sender.join(10)
    left.close()
    right.close()


def test_wake_ups_while_instances_arrive_are_merged_into_few_messages(tmp_path: Path) -> None:
    listener_end, worker_end = socket.socketpair()
    config = make_config(tmp_path, "sqlite:///" + str(tmp_path / "index.db"))
    channel = WorkerProcess(config, node_name="node-test", spool_lock_fd=None,
                            metrics=Metrics())
    channel._socket = listener_end
    channel._notifier.start()
    started = time.monotonic()
    for index in range(300):  # an instance stored every 0.5 ms, for 0.15 s
        channel.wake_upload()
        channel.wake_forward([f"pacs{index % 3}"])
        time.sleep(0.0005)
    elapsed = time.monotonic() - started
    time.sleep(3 * NOTIFY_INTERVAL_SECONDS)
    channel._stopping.set()
    with channel._pending:
        channel._pending.notify_all()
    channel._notifier.join(5)
    worker_end.settimeout(1)
    messages = []
    listener_end.shutdown(socket.SHUT_WR)
    with contextlib.suppress(ChannelClosedError):
        while True:
            messages.append(receive_message(worker_end))
    assert all(message["op"] == "stored" for message in messages)
    assert 1 <= len(messages) <= elapsed / NOTIFY_INTERVAL_SECONDS + 2
    assert set().union(*(message["destinations"] for message in messages)) == {
        "pacs0", "pacs1", "pacs2"}
    listener_end.close()
    worker_end.close()


def test_the_end_of_an_association_reaches_the_worker_after_its_wake_ups(
    tmp_path: Path,
) -> None:
    listener_end, worker_end = socket.socketpair()
    config = make_config(tmp_path, "sqlite:///" + str(tmp_path / "index.db"))
    channel = WorkerProcess(config, node_name="node-test", spool_lock_fd=None,
                            metrics=Metrics())
    channel._socket = listener_end
    channel.wake_upload()
    channel.wake_forward(["pacs"])
    channel.association_ended(["pacs"])
    channel._notifier.start()
    worker_end.settimeout(5)
    messages = [receive_message(worker_end), receive_message(worker_end)]
    channel._stopping.set()
    with channel._pending:
        channel._pending.notify_all()
    channel._notifier.join(5)
    assert messages == [{"op": "stored", "destinations": ["pacs"]},
                        {"op": "association_ended", "destinations": ["pacs"]}]
    listener_end.close()
    worker_end.close()
