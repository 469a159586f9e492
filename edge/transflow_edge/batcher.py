"""Adaptive micro-batching: concurrent requests merged into onnxruntime calls on one worker thread.

- A lone request never waits: the worker takes what is queued and runs it at once. It waits (at most
  `max_wait_ms`) only while other requests are known to be on their way, i.e. being parsed and preprocessed
  right now (`arriving`), and the batch is not full. Under load the queue fills while a call runs, so batches
  grow without anybody waiting.
- Text items are sorted by length and cut into the calls that minimise the modelled cost (a fixed cost per call
  plus the padded token rows), so padding to the longest does not eat the gain: measured on int8 MiniLM, one
  call of 16 texts of similar length costs 4.0 ms a text against 7.1 ms one by one, but 8.8 ms a text when
  the 16 are padded to the longest of a random mix. Results go back in request order.
- Jobs prepared for different models never share a call.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from transflow_edge.model import LoadedModel

log = logging.getLogger("transflow.edge")

# The fixed cost of one onnxruntime call, in token rows: int8 MiniLM on one CPU thread costs ~3.4 ms a call
# plus ~0.13 ms a token row (benchmarks/bench_edge.py's machine), so ~25 rows.
CALL_OVERHEAD_TOKENS = 25


@dataclass
class _Job:
    model: LoadedModel
    prepared: list[Any]
    future: Future[np.ndarray]


def length_groups(lengths: Sequence[int], max_batch: int) -> list[list[int]]:
    """Indices grouped into calls, minimising the modelled cost: items sorted by length, then the split that
    minimises sum over calls of (CALL_OVERHEAD_TOKENS + items x longest length), a small dynamic programme over
    the sorted order (at most max_batch per call). Padding to the longest is what the cost charges for."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    sorted_lengths = [lengths[i] for i in order]
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[j]: cheapest split of the first j sorted items
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(max(0, j - max_batch), j):
            cost = best[i] + CALL_OVERHEAD_TOKENS + (j - i) * sorted_lengths[j - 1]
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


class MicroBatcher:
    def __init__(
        self, max_batch: int, max_wait_ms: float, max_queue: int, on_batch: Callable[[int, int, float], None]
    ) -> None:
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait_ms / 1000, max_queue
        self.on_batch = on_batch
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._pending = 0
        self._arriving = 0  # requests between "body read" and "submitted": company worth waiting for
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="edge-batcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=10)
            self._thread = None

    def arriving(self) -> _Arrival:
        """`with batcher.arriving() as arrival: prepare…; arrival.submit(…)`: the worker knows a request is on
        its way from the start of its preprocessing until it is queued."""
        return _Arrival(self)

    def submit(self, model: LoadedModel, prepared: list[Any], arrival: _Arrival | None = None) -> Future[np.ndarray]:
        if self._thread is None:
            raise RuntimeError("the batcher is not running")
        job = _Job(model, prepared, Future())
        with self._lock:
            if self._pending + len(prepared) > self.max_queue:
                raise OverflowError(f"{self._pending} items queued")
            self._pending += len(prepared)
            if arrival is not None and not arrival.done:  # queued and no longer arriving, in one step
                arrival.done = True
                self._arriving -= 1
            self._queue.put(job)
        return job.future

    def _company_expected(self) -> bool:
        with self._lock:
            return self._arriving > 0

    def _run(self) -> None:
        stopping = False
        while not stopping:
            job = self._queue.get()
            if job is None:
                return
            jobs, size = [job], len(job.prepared)
            deadline = time.monotonic() + self.max_wait
            while size < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    if not self._company_expected() or time.monotonic() >= deadline:
                        break
                    try:  # someone is being parsed right now: worth a short wait
                        nxt = self._queue.get(timeout=min(0.0005, max(deadline - time.monotonic(), 0)))
                    except queue.Empty:
                        continue
                if nxt is None:
                    stopping = True
                    break
                jobs.append(nxt)
                size += len(nxt.prepared)
            self._execute(jobs)

    def _execute(self, jobs: list[_Job]) -> None:
        with self._lock:
            self._pending -= sum(len(j.prepared) for j in jobs)
        live = [j for j in jobs if j.future.set_running_or_notify_cancel()]  # clients that went away drop out
        for model in {id(j.model): j.model for j in live}.values():
            group = [j for j in live if j.model is model]
            try:
                self._run_calls(model, group)
            except Exception as exc:  # hand the failure to each waiting request, keep the worker alive
                for j in group:
                    if not j.future.done():
                        j.future.set_exception(exc)

    def _run_calls(self, model: LoadedModel, jobs: list[_Job]) -> None:
        """The jobs' items in as few calls as pay; each request is answered as soon as its own items are done
        (shortest texts first), not when the whole batch is."""
        items = [p for j in jobs for p in j.prepared]
        owner = [k for k, j in enumerate(jobs) for _ in j.prepared]
        starts = np.cumsum([0] + [len(j.prepared) for j in jobs])
        remaining = [len(j.prepared) for j in jobs]
        padded = model.modality == "text" and getattr(model.preprocessor, "padding", "") == "longest"
        if padded:
            calls = length_groups([len(ids) for ids, _ in items], self.max_batch)
        else:
            calls = [list(range(i, min(i + self.max_batch, len(items)))) for i in range(0, len(items), self.max_batch)]
        out: np.ndarray | None = None
        for call in calls:
            began = time.perf_counter()
            logits = model.logits([items[i] for i in call])
            self.on_batch(len(call), len(jobs), time.perf_counter() - began)
            if out is None:
                out = np.empty((len(items), *logits.shape[1:]), dtype=logits.dtype)
            out[call] = logits
            for i in call:
                k = owner[i]
                remaining[k] -= 1
                if remaining[k] == 0:
                    jobs[k].future.set_result(out[starts[k] : starts[k + 1]].copy())
            if model.drift is not None:  # after this call's answers are handed back: off their response path
                model.drift.observe_outputs(logits)


class _Arrival:
    def __init__(self, batcher: MicroBatcher) -> None:
        self.batcher, self.done = batcher, False

    def __enter__(self) -> _Arrival:
        with self.batcher._lock:
            self.batcher._arriving += 1
        return self

    def submit(self, model: LoadedModel, prepared: list[Any]) -> Future[np.ndarray]:
        return self.batcher.submit(model, prepared, self)

    def __exit__(self, *exc: object) -> None:
        with self.batcher._lock:
            if not self.done:  # refused before it was queued
                self.done = True
                self.batcher._arriving -= 1
