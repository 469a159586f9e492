"""Prometheus metrics of the edge server (prometheus_client, one registry per app) and the middleware that
counts every response.

Label values are bounded whatever clients send: the method is one of the HTTP methods the server knows (else
"other"), the endpoint is the matched route's template (`/v2/models/{name}/infer`, never the raw path; "other"
when nothing matched), the status is one the server itself answered.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from transflow_edge.drift import DriftCollector
from transflow_edge.model import LoadedModel

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
LOAD_SOURCES = frozenset({"startup", "upload", "watch", "rollback", "candidate"})  # candidate: a promoted one

disable_created_metrics()  # no `_created` twin of every series: half the scrape for a timestamp nobody reads


class Metrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "transflow_edge_requests",
            "HTTP requests by endpoint (route template), method and status.",
            ["endpoint", "method", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "transflow_edge_request_duration_seconds",
            "HTTP request latency by endpoint.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_items = Histogram(
            "transflow_edge_batch_size", "Items per onnxruntime call.", buckets=BATCH_BUCKETS, registry=registry
        )
        self.batch_requests = Histogram(
            "transflow_edge_batch_requests",
            "Requests merged into one onnxruntime call.",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.inference = Histogram(
            "transflow_edge_inference_seconds",
            "Time in onnxruntime per call.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.bundle_loads = Counter(
            "transflow_edge_bundle_loads", "Bundle loads by source and result.", ["source", "result"], registry=registry
        )
        self.ready = Gauge("transflow_edge_model_ready", "1 when a verified model is loaded.", registry=registry)
        self.info = Gauge(
            "transflow_edge_model_info",
            "The loaded model; always 1.",
            ["name", "version", "modality", "bundle_sha256"],
            registry=registry,
        )
        self._shown: LoadedModel | None = None
        registry.register(DriftCollector(lambda: self._shown))  # PSI per statistic of the model shown (drift.py)

    def observe_request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        method = method if method in METHODS else "other"
        self.requests.labels(endpoint, method, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def observe_batch(self, items: int, requests: int, seconds: float) -> None:
        self.batch_items.observe(items)
        self.batch_requests.observe(requests)
        self.inference.observe(seconds)

    def observe_load(self, source: str, result: str) -> None:
        self.bundle_loads.labels(source if source in LOAD_SOURCES else "other", result).inc()

    def render(self, model: LoadedModel | None) -> bytes:
        """The exposition text; the model gauges follow the model served now (one info series at a time)."""
        if model is not self._shown:
            self.info.clear()
            if model is not None:
                self.info.labels(model.name, model.version, model.modality, model.bundle.sha256).set(1)
            self._shown = model
        self.ready.set(int(model is not None))
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Count every response by route template and status, including errors raised below it."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

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
            route = scope.get("route")  # set by the router on the scope it was given: the template, not the path
            endpoint = getattr(route, "path", None) or "other"
            self.metrics.observe_request(endpoint, scope["method"], status, time.perf_counter() - started)
