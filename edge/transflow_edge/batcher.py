"""Micro-batching: concurrent requests merged into one onnxruntime call on a worker thread."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from transflow_edge.model import LoadedModel

log = logging.getLogger("transflow.edge")


@dataclass
class _Job:
    model: LoadedModel
    prepared: list[Any]
    future: Future[np.ndarray]


class MicroBatcher:
    """Queue prepared requests and run them together on one worker thread, at most `max_batch` items a call.

    The first request of a batch waits up to `max_wait_ms` for company; under load the queue fills while a
    batch runs, so batches grow without waiting. Jobs prepared for different models never share a call.
    """

    def __init__(
        self, max_batch: int, max_wait_ms: float, max_queue: int, on_batch: Callable[[int, int, float], None]
    ) -> None:
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait_ms / 1000, max_queue
        self.on_batch = on_batch
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="edge-batcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=10)
            self._thread = None

    def submit(self, model: LoadedModel, prepared: list[Any]) -> Future[np.ndarray]:
        if self._thread is None:
            raise RuntimeError("the batcher is not running")
        with self._pending_lock:
            if self._pending + len(prepared) > self.max_queue:
                raise OverflowError(f"{self._pending} items queued")
            self._pending += len(prepared)
        job = _Job(model, prepared, Future())
        self._queue.put(job)
        return job.future

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
                    nxt = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    break
                jobs.append(nxt)
                size += len(nxt.prepared)
            self._execute(jobs)

    def _execute(self, jobs: list[_Job]) -> None:
        with self._pending_lock:
            self._pending -= sum(len(j.prepared) for j in jobs)
        live = [j for j in jobs if j.future.set_running_or_notify_cancel()]  # clients that went away drop out
        for model in {id(j.model): j.model for j in live}.values():
            group = [j for j in live if j.model is model]
            items = [p for j in group for p in j.prepared]
            try:
                chunks = []
                for start in range(0, len(items), self.max_batch):
                    began = time.perf_counter()
                    chunks.append(model.logits(items[start : start + self.max_batch]))
                    self.on_batch(len(chunks[-1]), len(group), time.perf_counter() - began)
                logits = np.concatenate(chunks)
            except Exception as exc:  # hand the failure to each waiting request, keep the worker alive
                for j in group:
                    j.future.set_exception(exc)
                continue
            offset = 0
            for j in group:
                j.future.set_result(logits[offset : offset + len(j.prepared)])
                offset += len(j.prepared)
