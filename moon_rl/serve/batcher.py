"""Micro-batching: concurrent requests share one model forward.

Requests arrive one by one on the event loop, but a forward of the tiny model (or of a real one on a GPU) costs
about the same for 1 row as for 16. `MicroBatcher` queues each request's records; one worker thread (torch runs
there, never on the event loop) takes the first waiting request, keeps collecting until `max_batch` records are
queued or `max_wait_ms` have passed since that first one, then runs one `encode` call per embedding mode and hands
each request its rows back through a `concurrent.futures.Future` (awaitable with `asyncio.wrap_future`).

With `enabled=False` the worker runs every request on its own: the baseline `bench/serve_load.py` compares against.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moon_rl.errors import MoonError

logger = logging.getLogger(__name__)

#: `encode(records, mode)` -> (L2-normalised vectors (N, D), reasoning chains or None): what the worker calls.
EncodeFn = Callable[[list[Any], str], tuple[np.ndarray, list[str] | None]]


@dataclass
class Encoded:
    """One request's share of a batch: its vectors and, in reason mode, its reasoning chains."""

    vectors: np.ndarray
    chains: list[str] | None


@dataclass
class BatchStats:
    """What the worker did, for `/health` and for tests that check requests were merged."""

    requests: int = 0
    records: int = 0
    forwards: int = 0
    largest_batch: int = 0  # records in the largest single encode call
    errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class _Job:
    records: list[Any]
    mode: str
    future: Future = field(default_factory=Future)


_STOP = object()


class MicroBatcher:
    """Collects concurrent embedding requests into batched `encode` calls on one worker thread.

    Args:
        encode (`EncodeFn`): runs the model on a list of records in one mode.
        max_batch (`int`, *optional*, defaults to `16`): the most records one encode call collects; a request that
            would overfill a batch waits for the next (a single larger request still runs whole, in one call).
        max_wait_ms (`float`, *optional*, defaults to `5.0`): how long the first request of a batch waits for others.
            It bounds the latency batching adds when the service is idle.
        enabled (`bool`, *optional*, defaults to `True`): False runs each request alone (no waiting, no merging).
    """

    def __init__(self, encode: EncodeFn, *, max_batch: int = 16, max_wait_ms: float = 5.0, enabled: bool = True):
        if max_batch < 1:
            raise MoonError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise MoonError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.encode = encode
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.enabled = enabled
        self.stats = BatchStats()
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._held: _Job | None = None  # taken from the queue but left for the next batch (worker thread only)

    # ------------------------------------------------------------------ client side
    def submit(self, records: Sequence[Any], mode: str) -> Future:
        """Queue `records` (anything `MoonEmbedder.encode` takes) for embedding in `mode`; the future gives `Encoded`."""
        if not records:
            raise MoonError("nothing to embed: the request has no texts or images")
        self._ensure_started()
        job = _Job(list(records), mode)
        self._queue.put(job)
        return job.future

    def _ensure_started(self) -> None:
        # Started on first use, not in __init__: an app built for a test or a CLI --help costs no thread.
        with self._lock:
            if self._closed:
                raise MoonError("the embedding worker has been shut down")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="moon-rl-encode", daemon=True)
                self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker after the requests already queued."""
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is not None:
            self._queue.put(_STOP)
            thread.join(timeout)

    # ------------------------------------------------------------------ worker side
    def _collect(self, first: _Job) -> tuple[list[_Job], bool]:
        """`first` plus the jobs that arrive within the wait bound, up to `max_batch` records; True if told to stop."""
        jobs, count = [first], len(first.records)
        if not self.enabled:
            return jobs, False
        deadline = time.monotonic() + self.max_wait
        while count < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is _STOP:
                return jobs, True
            if count + len(job.records) > self.max_batch:
                self._held = job  # would overfill this batch: it opens the next one
                break
            jobs.append(job)
            count += len(job.records)
        return jobs, False

    def _run(self) -> None:
        stop = False
        while not stop:
            first, self._held = (self._held, None) if self._held is not None else (self._queue.get(), None)
            if first is _STOP:
                break
            jobs, stop = self._collect(first)
            for mode in dict.fromkeys(job.mode for job in jobs):
                self._forward([job for job in jobs if job.mode == mode], mode)

    def _forward(self, jobs: list[_Job], mode: str) -> None:
        records = [record for job in jobs for record in job.records]
        self.stats.requests += len(jobs)
        self.stats.records += len(records)
        self.stats.forwards += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(records))
        try:
            vectors, chains = self.encode(records, mode)
        except Exception as exc:  # handed to every waiting request; the worker must survive it
            self.stats.errors += 1
            logger.exception("encode failed for a batch of %d records", len(records))
            for job in jobs:
                job.future.set_exception(exc)
            return
        start = 0
        for job in jobs:
            end = start + len(job.records)
            job.future.set_result(Encoded(vectors[start:end], chains[start:end] if chains is not None else None))
            start = end
