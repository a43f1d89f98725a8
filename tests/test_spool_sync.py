"""The spool directory's shared fsync: callers waiting at the same time share one."""

from __future__ import annotations

import errno
import itertools
import threading

import pytest

from gateway.spool import SharedFsync
from tests.helpers.net import wait_until


class _Disk:
    """A stub fsync that can be held, made to fail, and records what it covered."""

    def __init__(self) -> None:
        self.calls = 0
        self.release = threading.Event()
        self.release.set()
        self.entered = threading.Event()
        self.fail_next = False
        self.fail_calls: set[int] = set()
        self.clock = itertools.count()
        self.lock = threading.Lock()
        self.succeeded: list[tuple[int, int]] = []  # (started, ended) of good fsyncs

    def tick(self) -> int:
        with self.lock:
            return next(self.clock)

    def fsync(self, fd: int) -> None:
        started = self.tick()
        self.calls += 1
        self.entered.set()
        assert self.release.wait(10)
        if self.fail_next or self.calls in self.fail_calls:
            self.fail_next = False
            raise OSError(errno.EIO, "Input/output error")
        self.succeeded.append((started, self.tick()))


def _in_thread(sync: SharedFsync, outcomes: list[object]) -> threading.Thread:
    def run() -> None:
        try:
            sync.sync()
            outcomes.append("ok")
        except OSError as exc:
            outcomes.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _hold_one(disk: _Disk, sync: SharedFsync, outcomes: list[object]) -> threading.Thread:
    disk.release.clear()
    first = _in_thread(sync, outcomes)
    assert disk.entered.wait(10)
    return first


def test_calls_one_after_another_each_get_their_own_fsync() -> None:
    disk = _Disk()
    sync = SharedFsync(3, fsync=disk.fsync)
    for _ in range(3):
        sync.sync()
    assert disk.calls == 3


def test_callers_arriving_during_an_fsync_share_the_next_one() -> None:
    disk = _Disk()
    sync = SharedFsync(3, fsync=disk.fsync)
    outcomes: list[object] = []
    threads = [_hold_one(disk, sync, outcomes)]
    threads += [_in_thread(sync, outcomes) for _ in range(5)]
    wait_until(lambda: sync._requested == 6, 10, message="five callers waiting")
    disk.release.set()
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive()
    assert outcomes == ["ok"] * 6
    assert disk.calls == 2  # the running one did not cover them: one more covers all five


def test_a_failed_fsync_fails_every_caller_it_covered_and_the_next_caller_retries() -> None:
    disk = _Disk()
    sync = SharedFsync(3, fsync=disk.fsync)
    outcomes: list[object] = []
    first = _hold_one(disk, sync, outcomes)
    disk.fail_next = True
    disk.release.set()
    first.join(10)
    assert not first.is_alive()
    assert isinstance(outcomes[0], OSError) and outcomes[0].errno == errno.EIO
    sync.sync()  # a later caller gets a fresh fsync
    assert disk.calls == 2


def test_waiters_covered_by_a_failed_fsync_all_fail() -> None:
    disk = _Disk()
    disk.fail_calls = {2}
    sync = SharedFsync(3, fsync=disk.fsync)
    outcomes: list[object] = []
    first_outcome: list[object] = []
    threads = [_hold_one(disk, sync, first_outcome)]  # fsync 1: held, then succeeds
    threads += [_in_thread(sync, outcomes) for _ in range(3)]
    wait_until(lambda: sync._requested == 4, 10, message="three callers waiting")
    disk.release.set()  # fsync 2 covers the three waiters and fails
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive()
    assert first_outcome == ["ok"]
    assert len(outcomes) == 3 and all(isinstance(o, OSError) for o in outcomes)
    assert disk.calls == 2


def test_every_caller_is_covered_by_an_fsync_that_started_after_it() -> None:
    disk = _Disk()
    sync = SharedFsync(3, fsync=disk.fsync)
    spans: list[tuple[int, int]] = []
    lock = threading.Lock()

    def caller() -> None:
        for _ in range(200):
            called = disk.tick()
            sync.sync()
            returned = disk.tick()
            with lock:
                spans.append((called, returned))

    threads = [threading.Thread(target=caller, daemon=True) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
        assert not thread.is_alive()
    assert len(spans) == 1600
    for called, returned in spans:
        assert any(called < started and ended < returned for started, ended in disk.succeeded)
    assert disk.calls <= 1600


@pytest.mark.parametrize("count", [1, 2, 5])
def test_sync_returns_for_each_caller(count: int) -> None:
    disk = _Disk()
    sync = SharedFsync(3, fsync=disk.fsync)
    outcomes: list[object] = []
    threads = [_in_thread(sync, outcomes) for _ in range(count)]
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive()
    assert outcomes == ["ok"] * count
