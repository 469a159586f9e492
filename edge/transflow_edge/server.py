"""The light edge inference server: one verified bundle served over HTTP, swapped atomically, no torch.

    POST /v1/predict          {"inputs": [...]} (text, or base64 images; images also as multipart files)
    GET  /v1/model            what is loaded: name, version, lineage, metrics, bundle sha256
    GET  /healthz · /readyz   process alive · a verified model is loaded
    GET  /metrics             Prometheus text: requests, latency, batch sizes, model info
    POST /v1/admin/bundles    upload a bundle .tar.gz (bearer token): verify, golden check, then swap
    POST /v1/admin/rollback   back to the previous bundle (bearer token)

With `watch_dir` (air-gapped sites), the newest `*.tar.gz` dropped into that folder is installed the same way;
`transflow deploy --target dir:///folder` writes archives there atomically, and deleting the newest rolls back.

Concurrent predict requests are micro-batched into one onnxruntime call on a worker thread, so the
event loop stays free. A new model is swapped in by one reference assignment: requests already
prepared for the old model finish on it. The state directory (`bundles/<sha256>/`, `current`,
`previous`) survives restarts.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import email.parser
import email.policy
import fcntl
import hmac
import json
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from transflow_edge import preprocess
from transflow_edge.bundle import MAX_BUNDLE_BYTES, Bundle, BundleError, safe_extract, verify_bundle
from transflow_edge.preprocess import PreprocessError, Preprocessor

log = logging.getLogger("transflow.edge")

TOKEN_ENV = "TRANSFLOW_EDGE_TOKEN"
MIN_TOKEN_CHARS = 16
LABELS = "labels.json"
GOLDEN = "golden.json"


@dataclass(frozen=True)
class Settings:
    """Everything the server can be told; the CLI fills it from flags and the environment."""

    bundle: Path | None = None  # a bundle dir or .tar.gz to install and serve at start
    state_dir: Path | None = None  # bundles/<sha256>/, current, previous; a temporary one when None
    token: str | None = None  # admin bearer token; None disables the admin endpoints
    max_items: int = 64
    max_text_chars: int = 10_000
    max_body_bytes: int = 16 << 20  # predict requests
    max_upload_bytes: int = 1 << 30  # bundle archives as sent
    max_bundle_bytes: int = MAX_BUNDLE_BYTES  # bundle archives unpacked
    max_batch: int = 32  # items per onnxruntime call; 1 disables micro-batching
    max_wait_ms: float = 2.0  # how long the first request of a batch waits for company
    max_queue: int = 4096  # queued items before predict answers 503
    intra_op_threads: int = 0  # 0: onnxruntime's choice (one per physical core)
    watch_dir: Path | None = None  # serve the newest bundle .tar.gz in this folder (air-gapped sites)
    watch_interval_s: float = 2.0  # how often the folder is looked at

    def __post_init__(self) -> None:
        if self.token is not None and len(self.token) < MIN_TOKEN_CHARS:
            raise ValueError(f"the admin token must have at least {MIN_TOKEN_CHARS} characters")
        if min(self.max_items, self.max_text_chars, self.max_body_bytes, self.max_batch, self.max_queue) < 1:
            raise ValueError("limits and batch sizes must be positive")
        if self.max_wait_ms < 0 or self.intra_op_threads < 0:
            raise ValueError("max_wait_ms and intra_op_threads must not be negative")
        if self.watch_interval_s <= 0:
            raise ValueError("watch_interval_s must be positive")


def load_token(token_file: Path | None = None, environ: dict[str, str] | None = None) -> str | None:
    """The admin token from --token-file, else from $TRANSFLOW_EDGE_TOKEN; None leaves admin disabled."""
    if token_file is not None:
        token = token_file.read_text().strip()
        if not token:
            raise ValueError(f"{token_file}: empty token file")
        return token
    return (environ if environ is not None else os.environ).get(TOKEN_ENV, "").strip() or None


# ---------------------------------------------------------------- the model


@dataclass(frozen=True)
class LoadedModel:
    """A verified bundle with its session and preprocessor: immutable, so a swap is one assignment."""

    bundle: Bundle
    session: ort.InferenceSession
    preprocessor: Preprocessor
    labels: list[str]
    feed_names: list[str]
    output_name: str
    loaded_at: str = ""
    golden: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.bundle.manifest.get("name", ""))

    @property
    def version(self) -> str:
        return str(self.bundle.manifest.get("version", ""))

    @property
    def modality(self) -> str:
        return self.preprocessor.modality

    def prepare(self, items: Sequence[Any]) -> list[Any]:
        """Per-item arrays; images arrive base64-encoded from JSON and are decoded here."""
        if self.modality == "image":
            items = [b64decode_image(item, i) for i, item in enumerate(items)]
        return self.preprocessor.prepare(items)

    def logits(self, prepared: Sequence[Any]) -> np.ndarray:
        features = self.preprocessor.collate(prepared)
        return self.session.run([self.output_name], {k: features[k] for k in self.feed_names})[0]


def b64decode_image(item: Any, index: int) -> bytes:
    """Image bytes from a base64 string (a `data:image/...;base64,` prefix is allowed); bytes pass through."""
    if isinstance(item, bytes):
        return item
    if not isinstance(item, str):
        raise PreprocessError(f"inputs[{index}]: expected a base64-encoded image string, got {type(item).__name__}")
    if item.startswith("data:") and "," in item:
        item = item.split(",", 1)[1]
    try:
        return base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError):
        raise PreprocessError(f"inputs[{index}]: not base64-encoded image bytes (this model takes images)") from None


def open_session(path: Path, intra_op_threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    # Spinning threads burn an edge box's CPU between requests for a few microseconds of latency.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _read_labels(bundle: Bundle) -> list[str]:
    if LABELS not in bundle.manifest.get("files", {}):
        raise BundleError(f"{LABELS}: missing from the bundle")
    try:
        labels = bundle.json(LABELS)
    except (OSError, ValueError) as exc:
        raise BundleError(f"{LABELS}: cannot be read ({exc})") from None
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise BundleError(f"{LABELS}: must be a non-empty list of class names")
    if len(set(labels)) != len(labels):
        raise BundleError(f"{LABELS}: class names must be unique")
    return labels


def load_model(bundle: Bundle, intra_op_threads: int = 0) -> LoadedModel:
    """Build session and preprocessor for a verified bundle and pass its golden check, or raise BundleError."""
    try:
        return _load_model(bundle, intra_op_threads)
    except BundleError:
        raise
    except Exception as exc:  # whatever an untrusted bundle triggers, the running model keeps serving
        raise BundleError(f"bundle cannot be loaded ({type(exc).__name__}: {exc})") from None


def _load_model(bundle: Bundle, intra_op_threads: int) -> LoadedModel:
    default_model = bundle.manifest["default_model"]
    try:
        preprocessor = preprocess.from_bundle(bundle)
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{preprocess.PREPROCESSING}: cannot be read ({exc})") from None
    if preprocessor.modality != bundle.manifest.get("modality"):
        raise BundleError(
            f"{preprocess.PREPROCESSING}: modality {preprocessor.modality!r} but manifest.json "
            f"says {bundle.manifest.get('modality')!r}"
        )
    labels = _read_labels(bundle)
    try:
        session = open_session(bundle.default_model, intra_op_threads)
    except Exception as exc:  # onnxruntime raises its own exception types for any unloadable model
        raise BundleError(f"{default_model}: onnxruntime cannot load it ({exc})") from None
    feed_names = [i.name for i in session.get_inputs()]
    missing = [n for n in feed_names if n not in preprocessor.input_names]
    if missing:
        raise BundleError(f"{default_model}: inputs {missing} are not produced by {preprocess.PREPROCESSING}")
    outputs = [o.name for o in session.get_outputs()]
    wanted = [o.get("name") for o in bundle.manifest.get("outputs") or [] if isinstance(o, dict)]
    output_name = next((n for n in wanted if n in outputs), outputs[0])
    model = LoadedModel(
        bundle, session, preprocessor, labels, feed_names, output_name, datetime.now(UTC).isoformat(timespec="seconds")
    )
    return replace(model, golden=check_golden(model))


def check_golden(model: LoadedModel) -> dict[str, Any]:
    """Run the bundle's own golden inputs: the logits must match within its atol, the clear winners too."""
    bundle = model.bundle
    if GOLDEN not in bundle.manifest.get("files", {}):
        raise BundleError(f"{GOLDEN}: missing from the bundle")
    try:
        golden = bundle.json(GOLDEN)
        expected = np.asarray(golden["logits"], dtype=np.float64)
        atol = float(golden.get("atol", 1e-3))
        inputs, want_labels = golden["inputs"], golden.get("labels")
        if not isinstance(inputs, list) or not inputs:
            raise ValueError("no golden inputs")
        prepared = model.prepare(inputs)
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
        raise BundleError(f"{GOLDEN}: unusable golden file ({exc})") from None
    try:
        # One extra row: a model exported with a fixed batch size must fail here, not under batched load.
        got = np.asarray(model.logits([*prepared, prepared[0]]), dtype=np.float64)[: len(prepared)]
    except Exception as exc:  # onnxruntime raises its own types for shape and type mismatches
        raise BundleError(f"{bundle.manifest['default_model']}: fails on the golden inputs ({exc})") from None
    if got.ndim != 2 or got.shape[1] != len(model.labels):
        raise BundleError(f"{LABELS}: {len(model.labels)} labels but the model outputs logits of shape {got.shape}")
    if got.shape != expected.shape:
        raise BundleError(f"{GOLDEN}: expected logits of shape {expected.shape}, the model gives {got.shape}")
    diff = float(np.max(np.abs(got - expected))) if got.size else 0.0
    if not np.isfinite(got).all() or diff > atol:
        raise BundleError(f"{GOLDEN}: model logits differ from the golden ones by {diff:.3g} (atol {atol})")
    if want_labels is not None:  # class names, or indices as the exporter writes them
        top2 = np.sort(expected, axis=1)[:, -2:] if expected.shape[1] > 1 else np.zeros((len(expected), 2))
        for i, want in enumerate(want_labels):
            top = int(np.argmax(got[i]))
            clear = top2[i, 1] - top2[i, 0] > 2 * atol  # near-ties may flip within atol
            if clear and want not in (top, model.labels[top]):
                raise BundleError(f"{GOLDEN}: input {i} is predicted as {model.labels[top]!r}, expected {want!r}")
    return {"checked": len(inputs), "max_abs_diff": diff, "atol": atol}


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


# ---------------------------------------------------------------- the state directory


class BundleStore:
    """`bundles/<sha256>/` plus `current` and `previous` pointer files, each written atomically."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.bundles = root / "bundles"
        self.staging = root / "staging"
        root.mkdir(parents=True, exist_ok=True)
        self._lock_file = (root / ".lock").open("w")
        try:  # one server per state dir: two would race on the pointers
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise RuntimeError(f"{root}: state directory is in use by another edge server") from None
        self.bundles.mkdir(exist_ok=True)
        shutil.rmtree(self.staging, ignore_errors=True)  # leftovers of a crash mid-upload
        self.staging.mkdir()

    def close(self) -> None:
        self._lock_file.close()

    def read_pointer(self, name: str) -> str | None:
        path = self.root / name
        if not path.is_file():
            return None
        value = path.read_text().strip()
        if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
            raise BundleError(f"{path}: not a bundle sha256")
        return value

    def write_pointer(self, name: str, value: str) -> None:
        tmp = self.root / f".{name}.tmp"
        with tmp.open("w") as fh:
            fh.write(value + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.root / name)
        dir_fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def new_staging(self) -> Path:
        path = self.staging / uuid.uuid4().hex
        path.mkdir()
        return path

    def adopt(self, staged: Path, sha256: str) -> Path:
        """Move a verified staged bundle to `bundles/<sha256>/` (same filesystem: one rename)."""
        final = self.bundles / sha256
        if final.exists():
            shutil.rmtree(final)
        staged.rename(final)
        return final

    def load(self, sha256: str) -> Bundle:
        """Verify a stored bundle again; its manifest must still hash to the name it is stored under."""
        bundle = verify_bundle(self.bundles / sha256)
        if bundle.sha256 != sha256:
            raise BundleError(f"manifest.json: changed on disk (sha256 {bundle.sha256}, stored as {sha256})")
        return bundle

    def prune(self, keep: set[str]) -> None:
        """Only the current and previous bundles stay: edge disks are small."""
        for path in self.bundles.iterdir():
            if path.name not in keep:
                shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- micro-batching


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


# ---------------------------------------------------------------- the watched folder


class DirectoryWatcher:
    """Install the newest `*.tar.gz` of a folder whenever it changes (by name, mtime and size).

    Writers rename complete archives into place (dot-prefixed temp names are skipped), so a half-copied file
    is never seen. Each archive is tried once: a rejected one is logged and the running model keeps serving.
    Deleting the newest archive makes the one before it the newest, which is how a deploy rolls a site back.
    """

    def __init__(self, folder: Path, interval_s: float, install: Callable[[Path, str], dict[str, Any]]) -> None:
        if not folder.is_dir():
            raise ValueError(f"{folder}: the watched folder does not exist")
        self.folder, self.interval_s, self.install = folder, interval_s, install
        self._seen: tuple[str, int, int] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def newest(self) -> tuple[Path, tuple[str, int, int]] | None:
        found = []
        for path in self.folder.iterdir():
            if path.name.endswith(".tar.gz") and not path.name.startswith("."):
                with contextlib.suppress(FileNotFoundError):  # removed while we looked
                    stat = path.stat()
                    found.append((stat.st_mtime_ns, path.name, stat.st_size, path))
        if not found:
            return None
        mtime, name, size, path = max(found)
        return path, (name, mtime, size)

    def poll(self) -> None:
        """One look at the folder; never raises, so the watching thread outlives any bad archive."""
        try:
            newest = self.newest()
        except OSError as exc:
            log.error("cannot list the watched folder %s: %s", self.folder, exc)
            return
        if newest is None or newest[1] == self._seen:
            return
        path, self._seen = newest
        try:
            result = self.install(path, "watch")
        except BundleError as exc:
            log.error("%s rejected, still serving the previous model: %s", path.name, exc)
        except Exception:  # an unreadable file must not stop the watching thread
            log.exception("%s could not be installed", path.name)
        else:
            log.info("%s: %s (bundle %s)", path.name, result["status"], result["bundle_sha256"][:12])

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="edge-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _run(self) -> None:
        self.poll()
        while not self._stop.wait(self.interval_s):
            self.poll()


# ---------------------------------------------------------------- metrics


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


# ---------------------------------------------------------------- the server's state


class ApiError(Exception):
    """An error answered as `{"error": message}` with a 4xx (or 503) status."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


class EdgeState:
    """The loaded model (one reference, swapped whole), the state directory and the batcher."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.watcher: DirectoryWatcher | None = None
        if settings.watch_dir is not None:  # first: a missing folder must fail before the state dir is locked
            self.watcher = DirectoryWatcher(settings.watch_dir, settings.watch_interval_s, self.install)
        self._temp_root: Path | None = None
        root = settings.state_dir
        if root is None:
            root = self._temp_root = Path(tempfile.mkdtemp(prefix="transflow-edge-"))
            log.warning("no --state-dir: uploaded bundles live in %s and are lost at exit", root)
        self.store = BundleStore(root)
        self.metrics = Metrics()
        self.batcher = MicroBatcher(
            settings.max_batch, settings.max_wait_ms, settings.max_queue, self.metrics.observe_batch
        )
        self.model: LoadedModel | None = None
        self.error: str | None = "no bundle loaded yet"
        self._admin = threading.Lock()

    # -- start and stop

    def start(self) -> None:
        """Install --bundle if given (errors are fatal), else load what `current` points to (errors: not ready)."""
        if self.settings.bundle is not None:
            self.install(self.settings.bundle, "startup")
        else:
            try:
                current = self.store.read_pointer("current")
                if current is not None:
                    self._switch(self._load_stored(current), source="startup", move_pointers=False)
            except BundleError as exc:
                self.error = f"current bundle failed verification: {exc}"
                self.metrics.observe_load("startup", "rejected")
                log.error("%s; not ready until a bundle is uploaded or rolled back to", self.error)

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        self.batcher.stop()
        self.store.close()
        if self._temp_root is not None:
            shutil.rmtree(self._temp_root, ignore_errors=True)

    # -- loading and swapping

    def _pointer(self, name: str) -> str | None:
        try:
            return self.store.read_pointer(name)
        except BundleError as exc:
            log.error("%s", exc)
            return None

    def _load_stored(self, sha256: str) -> LoadedModel:
        return load_model(self.store.load(sha256), self.settings.intra_op_threads)

    def _switch(self, model: LoadedModel, source: str, move_pointers: bool = True) -> None:
        """Persist the pointers first (a crash leaves a consistent state), then swap the one reference."""
        new = model.bundle.sha256
        if move_pointers:
            old = self._pointer("current")
            if old is not None and old != new:
                self.store.write_pointer("previous", old)
            self.store.write_pointer("current", new)
        self.model = model  # the atomic swap: requests already prepared keep their reference to the old model
        self.error = None
        self.metrics.observe_load(source, "loaded")
        self.store.prune({new, self._pointer("previous") or ""})
        log.info("serving %s version %s (bundle %s, from %s)", model.name, model.version, new[:12], source)

    def _stage(self, source: Path, staged: Path) -> Bundle:
        """A verified copy under the state dir: archives are safely extracted, directories copied file by file."""
        if not source.is_dir():
            return verify_bundle(safe_extract(source, staged, max_bytes=self.settings.max_bundle_bytes))
        original = verify_bundle(source)
        staged.mkdir()
        for name in [*original.manifest["files"], "manifest.json"]:
            target = staged / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(original.path(name), target)
        return verify_bundle(staged)  # verify what we keep, not what we read first

    def install(self, source: Path, kind: str = "upload", work: Path | None = None) -> dict[str, Any]:
        """Stage, verify, load and golden-check a bundle; swap it in only when every step passed."""
        own_work = work is None
        work = work if work is not None else self.store.new_staging()
        try:
            with self._admin:
                bundle = self._stage(source, work / "bundle")
                current = self.model
                if current is not None and current.bundle.sha256 == bundle.sha256:
                    return self.describe_change("unchanged", current)
                model = load_model(bundle, self.settings.intra_op_threads)
                final = self.store.adopt(bundle.root, bundle.sha256)
                model = replace(model, bundle=replace(bundle, root=final))
                self._switch(model, kind)
                return self.describe_change("loaded", model)
        except BundleError:
            self.metrics.observe_load(kind, "rejected")
            raise
        finally:
            if own_work:
                shutil.rmtree(work, ignore_errors=True)

    def rollback(self) -> dict[str, Any]:
        """Serve the previous bundle again (verified and golden-checked again); rolling back twice rolls forward."""
        with self._admin:
            previous = self._pointer("previous")
            if previous is None or not (self.store.bundles / previous).is_dir():
                raise LookupError("no previous bundle to roll back to")
            try:
                model = self._load_stored(previous)
            except BundleError:
                self.metrics.observe_load("rollback", "rejected")
                raise
            self._switch(model, "rollback")
            return self.describe_change("rolled_back", model)

    def describe_change(self, status: str, model: LoadedModel) -> dict[str, Any]:
        return {
            "status": status,
            "name": model.name,
            "version": model.version,
            "bundle_sha256": model.bundle.sha256,
            "golden": model.golden,
            "previous_bundle_sha256": self._pointer("previous"),
        }

    def describe(self, model: LoadedModel) -> dict[str, Any]:
        manifest = model.bundle.manifest
        lineage = manifest.get("lineage") or {}
        return {
            "name": model.name,
            "version": model.version,
            "modality": model.modality,
            "data_version": lineage.get("data_version"),
            "bundle_sha256": model.bundle.sha256,
            "loaded_at": model.loaded_at,
            "default_model": manifest.get("default_model"),
            "labels": model.labels,
            "inputs": manifest.get("inputs"),
            "outputs": manifest.get("outputs"),
            "lineage": lineage,
            "metrics": manifest.get("metrics") or {},
            "golden": model.golden,
            "previous_bundle_sha256": self._pointer("previous"),
        }


# ---------------------------------------------------------------- HTTP


def parse_multipart(content_type: str, body: bytes) -> list[tuple[str | None, str | None, bytes]]:
    """(field name, file name, bytes) of each part, with the standard library's MIME parser."""
    try:
        head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("ascii")
    except UnicodeEncodeError:
        raise ApiError(400, "malformed multipart Content-Type header") from None
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise ApiError(400, "malformed multipart body (no parts; is the boundary right?)")
    return [
        (
            part.get_param("name", header="content-disposition"),
            part.get_filename(),
            part.get_payload(decode=True) or b"",
        )
        for part in message.iter_parts()
    ]


def _check_declared_size(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes, more than the limit of {limit}")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` (declared or streamed)."""
    _check_declared_size(request, limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body larger than the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def receive_archive(request: Request, path: Path, limit: int) -> None:
    """The uploaded bundle to `path`: a raw body streams to disk; multipart takes its one file part."""
    content_type = request.headers.get("content-type", "")
    if content_type.lower().startswith("multipart/form-data"):
        files = [
            data
            for _, filename, data in parse_multipart(content_type, await read_body(request, limit))
            if filename is not None
        ]
        if len(files) != 1:
            raise ApiError(422, f"expected exactly one file in the multipart body, got {len(files)}")
        path.write_bytes(files[0])
    else:
        _check_declared_size(request, limit)
        size = 0
        with path.open("wb") as fh:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, f"bundle archive larger than the limit of {limit} bytes")
                fh.write(chunk)
    if path.stat().st_size == 0:
        raise ApiError(400, "empty body: send the bundle .tar.gz as the request body")


def parse_inputs(body: bytes, content_type: str, modality: str) -> list[Any]:
    """The list of raw inputs of a predict request, or a 4xx saying what is wrong with it."""
    if content_type.lower().startswith("multipart/form-data"):
        if modality != "image":
            raise ApiError(422, 'file uploads are for image models; this model takes text: send {"inputs": ["..."]}')
        items: list[Any] = [data for _, filename, data in parse_multipart(content_type, body) if filename is not None]
        if not items:
            raise ApiError(422, "no image files in the multipart body")
        return items
    if not body:
        raise ApiError(400, 'empty body: send JSON {"inputs": [...]}')
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        raise ApiError(400, "request body is not valid JSON") from None
    if not isinstance(payload, dict) or "inputs" not in payload:
        raise ApiError(422, 'expected a JSON object {"inputs": [...]}')
    items = payload["inputs"]
    if not isinstance(items, list):
        raise ApiError(422, f'"inputs" must be a list, got {type(items).__name__}')
    return items


def check_inputs(items: list[Any], modality: str, settings: Settings) -> None:
    if not items:
        raise ApiError(422, '"inputs" is empty')
    if len(items) > settings.max_items:
        raise ApiError(413, f"{len(items)} inputs, more than the limit of {settings.max_items} per request")
    for i, item in enumerate(items):
        if modality == "text" and not isinstance(item, str):
            raise ApiError(422, f"inputs[{i}]: expected a string, got {type(item).__name__} (this model takes text)")
        if modality == "text" and len(item) > settings.max_text_chars:
            raise ApiError(
                413, f"inputs[{i}]: {len(item)} characters, more than the limit of {settings.max_text_chars}"
            )
        if modality == "image" and not isinstance(item, str | bytes):
            raise ApiError(422, f"inputs[{i}]: expected a base64-encoded image, got {type(item).__name__}")


def predictions(model: LoadedModel, logits: np.ndarray) -> list[dict[str, Any]]:
    out = []
    for row in softmax(logits):
        top = int(np.argmax(row))
        out.append(
            {
                "label": model.labels[top],
                "score": float(row[top]),
                "scores": {label: float(p) for label, p in zip(model.labels, row, strict=True)},
            }
        )
    return out


def create_app(settings: Settings) -> FastAPI:
    """The app over one EdgeState; a bad --bundle raises here, before anything listens."""
    state = EdgeState(settings)
    try:
        state.start()
    except BaseException:
        state.close()
        raise

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.batcher.start()
        if state.watcher is not None:
            state.watcher.start()
        try:
            yield
        finally:
            state.close()

    app = FastAPI(title="transflow edge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.edge = state

    def require_model() -> LoadedModel:
        model = state.model
        if model is None:
            raise ApiError(503, f"no model loaded: {state.error}")
        return model

    def require_admin(request: Request) -> None:
        if settings.token is None:
            raise ApiError(403, f"admin endpoints are disabled: start the server with ${TOKEN_ENV} or --token-file")
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.token.encode()):
            raise ApiError(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error", exc_info=exc)
        return JSONResponse({"error": f"internal error ({type(exc).__name__})"}, 500)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        model = state.model
        if model is None:
            return JSONResponse({"ready": False, "error": state.error}, 503)
        return JSONResponse({"ready": True, "name": model.name, "version": model.version})

    @app.get("/v1/model")
    async def model_info() -> dict[str, Any]:
        return state.describe(require_model())

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(state.metrics.render(state.model), media_type="text/plain; version=0.0.4")

    @app.post("/v1/predict")
    async def predict(request: Request) -> dict[str, Any]:
        started = time.perf_counter()
        model = require_model()  # this request uses this model to the end, whatever is swapped in meanwhile
        body = await read_body(request, settings.max_body_bytes)
        items = parse_inputs(body, request.headers.get("content-type", ""), model.modality)
        check_inputs(items, model.modality, settings)
        try:
            prepared = await run_in_threadpool(model.prepare, items)
        except PreprocessError as exc:
            raise ApiError(422, str(exc)) from None
        try:
            future = state.batcher.submit(model, prepared)
        except OverflowError:
            raise ApiError(503, "overloaded: too many queued inputs, retry shortly", {"Retry-After": "1"}) from None
        except RuntimeError:
            raise ApiError(503, "the server is shutting down") from None
        logits = await asyncio.wrap_future(future)
        return {
            "predictions": predictions(model, logits),
            "model": {"name": model.name, "version": model.version},
            "latency_ms": round((time.perf_counter() - started) * 1000, 3),
        }

    @app.post("/v1/admin/bundles")
    async def upload_bundle(request: Request) -> dict[str, Any]:
        require_admin(request)
        work = state.store.new_staging()
        try:
            archive = work / "upload.tar.gz"
            await receive_archive(request, archive, settings.max_upload_bytes)
            return await run_in_threadpool(state.install, archive, "upload", work)
        except BundleError as exc:
            raise ApiError(422, f"bundle rejected, still serving the previous model: {exc}") from None
        finally:
            await run_in_threadpool(shutil.rmtree, work, True)

    @app.post("/v1/admin/rollback")
    async def rollback(request: Request) -> dict[str, Any]:
        require_admin(request)
        try:
            return await run_in_threadpool(state.rollback)
        except LookupError as exc:
            raise ApiError(409, str(exc)) from None
        except BundleError as exc:
            raise ApiError(422, f"previous bundle rejected, still serving the current model: {exc}") from None

    endpoints = {route.path for route in app.routes if hasattr(route, "path")}
    app.add_middleware(MetricsMiddleware, metrics=state.metrics, endpoints=endpoints)
    return app


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 8080, log_level: str = "info") -> None:
    """Run the server in the foreground (one process: the model, the batcher and the state dir are per process)."""
    import uvicorn

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    uvicorn.run(app, host=host, port=port, log_level=log_level, server_header=False, timeout_graceful_shutdown=10)
