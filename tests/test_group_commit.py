"""Group commit's hand-over between threads (no database: the batch runner is a stub)."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest

from gateway.group_commit import GroupCommit
from tests.helpers.net import wait_until


class _Runner:
    """Doubles each unit; a unit ``"fail"`` gets its own error; holds batches on request."""

    def __init__(self) -> None:
        self.batches: list[list[object]] = []
        self.release = threading.Event()
        self.release.set()
        self.entered = threading.Event()
        self.raise_batch: BaseException | None = None

    def __call__(self, units: Sequence[object]) -> list[object]:
        self.batches.append(list(units))
        self.entered.set()
        assert self.release.wait(10)
        if self.raise_batch is not None:
            error, self.raise_batch = self.raise_batch, None
            raise error
        return [ValueError(f"refused {u}") if u == "fail" else (u, "done") for u in units]


def _submit_in_thread(group: GroupCommit[object, object], unit: object,
                      results: dict[object, object]) -> threading.Thread:
    def run() -> None:
        try:
            results[unit] = group.submit(unit)
        except Exception as exc:
            results[unit] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _hold_first_batch(runner: _Runner, group: GroupCommit[object, object],
                      results: dict[object, object]) -> threading.Thread:
    """Start a leader whose batch (unit 0) is held until ``runner.release`` is set."""
    runner.release.clear()
    leader = _submit_in_thread(group, 0, results)
    assert runner.entered.wait(10)
    return leader


def _wait_queued(group: GroupCommit[object, object], count: int) -> None:
    wait_until(lambda: len(group._pending) == count, 10, message=f"{count} units queued")


def test_a_lone_unit_is_its_own_batch() -> None:
    runner = _Runner()
    group: GroupCommit[object, object] = GroupCommit(runner)
    assert group.submit(1) == (1, "done")
    assert group.submit(2) == (2, "done")
    assert runner.batches == [[1], [2]]


def test_units_arriving_during_a_commit_share_the_next_batch_and_get_their_own_results() -> None:
    runner = _Runner()
    sizes: list[int] = []
    group: GroupCommit[object, object] = GroupCommit(runner, on_batch=sizes.append)
    results: dict[object, object] = {}
    threads = [_hold_first_batch(runner, group, results)]
    for unit in (1, 2, "fail", 3):
        threads.append(_submit_in_thread(group, unit, results))
    _wait_queued(group, 4)
    runner.release.set()
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive()
    assert [sorted(map(str, b)) for b in runner.batches] == [["0"], ["1", "2", "3", "fail"]]
    assert sizes == [1, 4]
    assert results[0] == (0, "done")
    assert results[1] == (1, "done") and results[3] == (3, "done")
    assert isinstance(results["fail"], ValueError) and "refused fail" in str(results["fail"])


def test_a_failing_batch_fails_its_units_only_and_the_next_batch_runs() -> None:
    runner = _Runner()
    group: GroupCommit[object, object] = GroupCommit(runner)
    results: dict[object, object] = {}
    leader = _hold_first_batch(runner, group, results)
    runner.raise_batch = RuntimeError("database went away")
    waiting = _submit_in_thread(group, 1, results)
    _wait_queued(group, 1)
    runner.release.set()
    leader.join(10)
    assert not leader.is_alive()
    waiting.join(10)
    assert not waiting.is_alive()
    assert isinstance(results[0], RuntimeError)
    assert results[1] == (1, "done")  # its batch came after the failure
    assert group.submit(2) == (2, "done")  # nobody is left holding the lead


def test_a_runner_answering_the_wrong_number_of_results_fails_the_batch() -> None:
    group: GroupCommit[object, object] = GroupCommit(lambda units: [])
    with pytest.raises(RuntimeError, match="result count"):
        group.submit(1)


def test_a_runner_answering_something_unusable_fails_the_batch_and_hands_on() -> None:
    group: GroupCommit[object, object] = GroupCommit(lambda units: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError):
        group.submit(1)
    assert not group._busy and not group._pending


def test_batches_are_capped_and_the_rest_waits_for_the_next() -> None:
    runner = _Runner()
    group: GroupCommit[object, object] = GroupCommit(runner, max_batch=2)
    results: dict[object, object] = {}
    threads = [_hold_first_batch(runner, group, results)]
    threads += [_submit_in_thread(group, unit, results) for unit in (1, 2, 3)]
    _wait_queued(group, 3)
    runner.release.set()
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive()
    assert [len(batch) for batch in runner.batches] == [1, 2, 1]
    assert all(results[unit] == (unit, "done") for unit in (0, 1, 2, 3))


def test_many_threads_get_every_result_exactly_once() -> None:
    runner = _Runner()
    sizes: list[int] = []
    group: GroupCommit[object, object] = GroupCommit(runner, max_batch=5, on_batch=sizes.append)
    results: dict[object, object] = {}
    lock = threading.Lock()

    def sender(base: int) -> None:
        for index in range(300):
            unit = base * 1000 + index
            answer = group.submit(unit)
            with lock:
                results[unit] = answer

    threads = [threading.Thread(target=sender, args=(base,), daemon=True) for base in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
        assert not thread.is_alive()
    assert len(results) == 2400
    assert all(answer == (unit, "done") for unit, answer in results.items())
    assert sum(sizes) == 2400 and max(sizes) <= 5
    assert not group._busy and not group._pending


def test_a_failing_batch_metric_does_not_strand_the_batch() -> None:
    def broken(size: int) -> None:
        raise RuntimeError("metric failed")

    group: GroupCommit[object, object] = GroupCommit(_Runner(), on_batch=broken)
    assert group.submit(1) == (1, "done")
    assert group.submit(2) == (2, "done")


def test_max_batch_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        GroupCommit(_Runner(), max_batch=0)
