"""Prometheus metrics of the edge server and the middleware that counts every response."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from transflow_edge.model import LoadedModel

log = logging.getLogger("transflow.edge")


LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class _Histogram:
    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def render(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        pairs = zip(self.buckets, self.counts, strict=True)
        lines = [f'{name}_bucket{{{labels}{sep}le="{b:g}"}} {c}' for b, c in pairs]
        lines.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        suffix = f"{{{labels}}}" if labels else ""
        return [*lines, f"{name}_sum{suffix} {self.sum:.6f}", f"{name}_count{suffix} {self.count}"]


def _label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """Prometheus text format by hand: the edge extra stays free of a metrics client."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = {}
        self.latency: dict[str, _Histogram] = {}
        self.batch_items = _Histogram(BATCH_BUCKETS)
        self.batch_requests = _Histogram(BATCH_BUCKETS)
        self.inference = _Histogram(LATENCY_BUCKETS)
        self.bundle_loads: dict[tuple[str, str], int] = {}

    def observe_request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        with self._lock:
            key = (endpoint, method, status)
            self.requests[key] = self.requests.get(key, 0) + 1
            self.latency.setdefault(endpoint, _Histogram(LATENCY_BUCKETS)).observe(seconds)

    def observe_batch(self, items: int, requests: int, seconds: float) -> None:
        with self._lock:
            self.batch_items.observe(items)
            self.batch_requests.observe(requests)
            self.inference.observe(seconds)

    def observe_load(self, source: str, result: str) -> None:
        with self._lock:
            self.bundle_loads[(source, result)] = self.bundle_loads.get((source, result), 0) + 1

    def render(self, model: LoadedModel | None) -> str:
        def family(name: str, kind: str, help_: str) -> list[str]:
            return [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]

        with self._lock:
            out = family("transflow_edge_requests_total", "counter", "HTTP requests by endpoint, method and status.")
            out += [
                f'transflow_edge_requests_total{{endpoint="{_label(e)}",method="{m}",status="{s}"}} {n}'
                for (e, m, s), n in sorted(self.requests.items())
            ]
            out += family("transflow_edge_request_duration_seconds", "histogram", "HTTP request latency.")
            for endpoint, hist in sorted(self.latency.items()):
                out += hist.render("transflow_edge_request_duration_seconds", f'endpoint="{_label(endpoint)}"')
            out += family("transflow_edge_batch_size", "histogram", "Items per onnxruntime call.")
            out += self.batch_items.render("transflow_edge_batch_size")
            out += family("transflow_edge_batch_requests", "histogram", "Requests merged into one onnxruntime call.")
            out += self.batch_requests.render("transflow_edge_batch_requests")
            out += family("transflow_edge_inference_seconds", "histogram", "Time in onnxruntime per call.")
            out += self.inference.render("transflow_edge_inference_seconds")
            out += family("transflow_edge_bundle_loads_total", "counter", "Bundle loads by source and result.")
            out += [
                f'transflow_edge_bundle_loads_total{{source="{s}",result="{r}"}} {n}'
                for (s, r), n in sorted(self.bundle_loads.items())
            ]
        out += family("transflow_edge_model_ready", "gauge", "1 when a verified model is loaded.")
        out.append(f"transflow_edge_model_ready {int(model is not None)}")
        out += family("transflow_edge_model_info", "gauge", "The loaded model; always 1.")
        if model is not None:
            out.append(
                f'transflow_edge_model_info{{name="{_label(model.name)}",version="{_label(model.version)}",'
                f'modality="{model.modality}",bundle_sha256="{model.bundle.sha256}"}} 1'
            )
        return "\n".join(out) + "\n"


class MetricsMiddleware:
    """Count every response by route and status, including errors raised below it."""

    def __init__(self, app: ASGIApp, metrics: Metrics, endpoints: set[str]) -> None:
        self.app, self.metrics, self.endpoints = app, metrics, endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            endpoint = scope["path"] if scope["path"] in self.endpoints else "other"
            self.metrics.observe_request(endpoint, scope["method"], status, time.perf_counter() - started)
