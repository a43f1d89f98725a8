"""A forward worker's gather before its next claim: cut short when an association whose
instances were routed to its destination ends, for every worker of that destination,
never by other destinations' associations, never shorter than the minimum."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import cast

import pytest

from gateway import forwarder
from gateway.config import DestinationConfig
from gateway.forwarder import DestinationWorker, Forwarder, ForwardSettings


@pytest.fixture
def pacs_and_vna(monkeypatch: pytest.MonkeyPatch) -> Forwarder:
    monkeypatch.setattr(forwarder, "_GATHER_SECONDS", 30.0)
    monkeypatch.setattr(forwarder, "_GATHER_MIN_SECONDS", 0.0)
    settings = cast(ForwardSettings, SimpleNamespace(node_name="node"))
    destinations = [
        DestinationConfig(name=name, ae_title=name.upper(), host="127.0.0.1", port=104,
                          max_associations=2)
        for name in ("pacs", "vna")
    ]
    return Forwarder(destinations, settings)


def _workers(forwarding: Forwarder, destination: str) -> list[DestinationWorker]:
    return [w for w in forwarding.workers if w.destination.name == destination]


def _gathering(worker: DestinationWorker) -> threading.Thread:
    thread = threading.Thread(target=worker._gather)
    thread.start()
    return thread


def _claimed(worker: DestinationWorker) -> None:
    worker._ended_seen = worker.state.ended_count  # as the worker does before a claim


def test_an_association_routed_to_the_destination_ends_every_workers_gather(
    pacs_and_vna: Forwarder,
) -> None:
    first, second = _workers(pacs_and_vna, "pacs")
    for worker in (first, second):
        _claimed(worker)
    threads = [_gathering(first), _gathering(second)]
    pacs_and_vna.settle(["pacs"])
    for thread in threads:
        thread.join(5)
        assert not thread.is_alive()


def test_an_association_that_ended_before_the_gather_ends_it_at_once(
    pacs_and_vna: Forwarder,
) -> None:
    # Another worker's claim in between must not swallow it (each worker counts).
    first, second = _workers(pacs_and_vna, "pacs")
    _claimed(first)
    pacs_and_vna.settle(["pacs"])
    _claimed(second)
    thread = _gathering(first)
    thread.join(5)
    assert not thread.is_alive()


@pytest.mark.parametrize("ended", [["vna"], []])
def test_other_destinations_associations_do_not_end_the_gather(
    pacs_and_vna: Forwarder, monkeypatch: pytest.MonkeyPatch, ended: list[str]
) -> None:
    monkeypatch.setattr(forwarder, "_GATHER_SECONDS", 0.3)
    worker = _workers(pacs_and_vna, "pacs")[0]
    _claimed(worker)
    started = time.monotonic()
    thread = _gathering(worker)
    pacs_and_vna.settle(ended)
    thread.join(5)
    assert time.monotonic() - started >= 0.3


def test_the_gather_lasts_at_least_the_minimum(
    pacs_and_vna: Forwarder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(forwarder, "_GATHER_MIN_SECONDS", 0.2)
    worker = _workers(pacs_and_vna, "pacs")[0]
    _claimed(worker)
    pacs_and_vna.settle(["pacs"])
    started = time.monotonic()
    worker._gather()
    assert time.monotonic() - started >= 0.2


def test_stopping_ends_the_gather(pacs_and_vna: Forwarder) -> None:
    worker = _workers(pacs_and_vna, "pacs")[0]
    _claimed(worker)
    thread = _gathering(worker)
    worker.stop()
    thread.join(5)
    assert not thread.is_alive()

