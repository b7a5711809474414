"""The micro-batcher on its own, with a fake model: what it merges, what it keeps apart, how it fails."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from moon_rl.errors import MoonError
from moon_rl.serve.batcher import MicroBatcher


class FakeModel:
    """Vectors that encode the record (its number) and the mode; remembers every call."""

    def __init__(self, fail_on: str | None = None):
        self.calls: list[tuple[list[int], str]] = []
        self.fail_on = fail_on
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, records, mode):
        self.entered.set()
        self.gate.wait(10)
        self.calls.append((list(records), mode))
        if self.fail_on in records:
            raise RuntimeError(f"cannot embed {self.fail_on}")
        vectors = np.array([[float(r), 1.0 if mode == "reason" else 0.0] for r in records], dtype=np.float32)
        return vectors, ([f"chain {r}" for r in records] if mode == "reason" else None)


def submit_held(batcher: MicroBatcher, model: FakeModel, jobs: list[tuple[list, str]]):
    """Submit every job while the model is busy with a first one, so they all wait in the queue together."""
    model.gate.clear()
    first = batcher.submit([-1], "direct")
    assert model.entered.wait(10)
    futures = [batcher.submit(records, mode) for records, mode in jobs]
    model.gate.set()
    first.result(10)
    return [future.result(10) for future in futures]


def test_concurrent_requests_share_one_forward_and_get_their_own_rows():
    model = FakeModel()
    batcher = MicroBatcher(model, max_batch=64, max_wait_ms=200)
    results = submit_held(batcher, model, [([i, i + 100], "direct") for i in range(10)])
    assert [calls for calls, _ in model.calls[1:]] == [[r for i in range(10) for r in (i, i + 100)]]
    for i, encoded in enumerate(results):
        assert encoded.vectors[:, 0].tolist() == [i, i + 100] and encoded.chains is None
    assert batcher.stats.forwards == 2 and batcher.stats.requests == 11 and batcher.stats.largest_batch == 20
    batcher.close()


def test_max_batch_bounds_a_forward_and_modes_never_mix():
    model = FakeModel()
    batcher = MicroBatcher(model, max_batch=4, max_wait_ms=200)
    jobs = [([i], "reason" if i % 2 else "direct") for i in range(8)]
    results = submit_held(batcher, model, jobs)
    sizes = [len(records) for records, _ in model.calls[1:]]
    assert sum(sizes) == 8 and max(sizes) <= 4
    assert all(len({r % 2 for r in records}) == 1 for records, _ in model.calls[1:])  # one mode per forward
    for (records, mode), encoded in zip(jobs, results, strict=True):
        assert encoded.vectors[0].tolist() == [records[0], 1.0 if mode == "reason" else 0.0]
        assert encoded.chains == ([f"chain {records[0]}"] if mode == "reason" else None)
    batcher.close()


def test_a_request_that_would_overfill_a_batch_opens_the_next():
    model = FakeModel()
    batcher = MicroBatcher(model, max_batch=5, max_wait_ms=200)
    results = submit_held(batcher, model, [([10 * i, 10 * i + 1, 10 * i + 2], "direct") for i in range(4)] +
                          [([99] * 7, "direct")])
    assert [len(records) for records, _ in model.calls[1:]] == [3, 3, 3, 3, 7]  # never 6 of 5; 7 runs whole
    assert [r.vectors[:, 0].tolist() for r in results[:2]] == [[0, 1, 2], [10, 11, 12]]
    batcher.close()


def test_without_batching_each_request_is_its_own_forward():
    model = FakeModel()
    batcher = MicroBatcher(model, max_batch=64, max_wait_ms=200, enabled=False)
    submit_held(batcher, model, [([i], "direct") for i in range(5)])
    assert [records for records, _ in model.calls] == [[-1], [0], [1], [2], [3], [4]]
    batcher.close()


def test_a_failing_forward_fails_its_requests_and_the_worker_goes_on():
    model = FakeModel(fail_on=3)
    batcher = MicroBatcher(model, max_batch=64, max_wait_ms=50)
    with pytest.raises(RuntimeError, match="cannot embed 3"):
        batcher.submit([3], "direct").result(10)
    assert batcher.submit([4], "direct").result(10).vectors[0, 0] == 4
    assert batcher.stats.errors == 1
    batcher.close()
    with pytest.raises(MoonError, match="shut down"):
        batcher.submit([5], "direct")


def test_bad_settings_and_empty_requests_are_refused():
    with pytest.raises(MoonError, match="max_batch must be >= 1, got 0"):
        MicroBatcher(FakeModel(), max_batch=0)
    with pytest.raises(MoonError, match="max_wait_ms must be >= 0"):
        MicroBatcher(FakeModel(), max_wait_ms=-1)
    with pytest.raises(MoonError, match="nothing to embed"):
        MicroBatcher(FakeModel()).submit([], "direct")
