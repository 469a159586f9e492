"""A candidate model beside the live one: shadow (every request answered by the live model, a copy scored by the
candidate off the response path) or canary (a fraction of requests answered by the candidate).

- The copy goes through a bounded queue to one worker thread (10 nice levels below the server where Linux
  allows it, and it waits up to 50 ms for the live path to be idle before each copy): when the queue is full the
  copy is dropped and counted, the live request never waits. The worker runs the *other* model on the same
  prepared inputs (the candidate in shadow mode, the live model for canary-answered requests) and records top-1
  agreement with the answer that was sent.
- Figures per version (requests, errors, latency from prepared inputs to logits: p50 and p95 of the last
  `LATENCY_WINDOW`) for the live model and the candidate, kept while the candidate is installed. `p95_ratio`
  compares like with like: in canary mode both models answer requests through the same batcher; in shadow
  mode the candidate runs on the worker thread, so every `PAIR_EVERY`-th copy also times the live model there.
  They are what the deploy flow judges (`GET /v1/model` → `candidate`) and what `/metrics` shows (version label
  only on these two roles, so the series stay bounded).
- The candidate survives restarts like current/previous (`state.json`, one atomic write); its figures do not:
  `watched_s` starts again at 0.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import random
import re
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from transflow_edge.bundle import BundleError
from transflow_edge.model import LoadedModel
from transflow_edge.parsing import ApiError
from transflow_edge.preprocess import PREPROCESSING

if TYPE_CHECKING:
    from transflow_edge.state import EdgeState

log = logging.getLogger("transflow.edge")

MODES = ("shadow", "canary")
SHADOW_MAX_ITEMS = 512  # inputs waiting for the candidate; above it copies are dropped (and counted)
LATENCY_WINDOW = 4096  # latencies kept per version for p50 / p95
STICKY_HEADER = re.compile(r"^[A-Za-z0-9-]{1,64}$")
SHADOW_NICE = 10  # the worker thread's niceness: live requests first when the CPU is short
QUIET_WAIT_S = 0.05  # the worker waits up to this long for the live path to be idle before each copy
PAIR_EVERY = 4  # shadow: every 4th copy also times the live model on the worker, for a like-for-like p95 ratio


def parse_options(mode: str | None, fraction: str | None, sticky: str | None) -> dict[str, Any]:
    """The query of `POST /v1/admin/candidate`, checked before the body is read."""
    if mode not in MODES:
        raise ApiError(422, f"mode must be one of {', '.join(MODES)}")
    try:
        share = float(fraction) if fraction not in (None, "") else (0.1 if mode == "canary" else 0.0)
    except ValueError:
        raise ApiError(422, "fraction must be a number between 0 and 1") from None
    if not 0.0 <= share <= 1.0:
        raise ApiError(422, "fraction must be a number between 0 and 1")
    if sticky is not None and sticky != "" and not STICKY_HEADER.match(sticky):
        raise ApiError(422, "sticky must be a header name (letters, digits, dashes; at most 64)")
    return {"mode": mode, "fraction": share if mode == "canary" else 0.0, "sticky": sticky.lower() if sticky else None}


class VersionStats:
    """Requests, errors and a window of latencies of one version, thread-safe."""

    def __init__(self) -> None:
        self.requests = self.errors = 0
        self.latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._lock = threading.Lock()

    def observe(self, seconds: float | None, error: bool = False) -> None:
        with self._lock:
            self.requests += 1
            self.errors += int(error)
            if seconds is not None and not error:
                self.latencies.append(seconds)

    def figures(self, version: str) -> dict[str, Any]:
        with self._lock:
            lat = np.asarray(self.latencies, dtype=np.float64)
            requests, errors = self.requests, self.errors
        p50, p95 = (float(np.percentile(lat, 50)), float(np.percentile(lat, 95))) if lat.size else (None, None)
        return {
            "version": version,
            "requests": requests,
            "errors": errors,
            "error_rate": errors / requests if requests else 0.0,
            "p50_ms": None if p50 is None else round(p50 * 1000, 3),
            "p95_ms": None if p95 is None else round(p95 * 1000, 3),
        }


@dataclass
class Candidate:
    model: LoadedModel
    mode: str
    fraction: float
    sticky: str | None
    installed_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    since: float = field(default_factory=time.monotonic)
    live: VersionStats = field(default_factory=VersionStats)
    stats: VersionStats = field(default_factory=VersionStats)
    paired: VersionStats = field(default_factory=VersionStats)  # shadow: the live model timed on the worker
    compared: int = 0
    agreed: int = 0
    dropped: int = 0

    @property
    def options(self) -> dict[str, Any]:
        return {"mode": self.mode, "fraction": self.fraction, "sticky": self.sticky}


@dataclass
class _Job:
    candidate: Candidate
    model: LoadedModel  # the model that did not answer
    answered_by: LoadedModel
    role: str  # its role: "candidate" (shadow) or "live" (a canary-answered request checked by the live model)
    prepared: list[Any] | None
    items: list[Any] | None
    answered: list[str]  # the top-1 labels that were sent


def _prep_key(model: LoadedModel) -> tuple[Any, ...]:
    files = model.bundle.manifest.get("files", {})
    return model.modality, files.get(PREPROCESSING), files.get("tokenizer.json")


class CandidateSlot:
    """The candidate of one server: install, route, mirror, promote, drop; persisted in the store."""

    def __init__(self, state: EdgeState) -> None:
        self.state = state
        self.current: Candidate | None = None
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._queued = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # -- lifecycle

    def restore(self) -> None:
        """At start: load the candidate state.json names (verified and golden-checked again); a bad one is
        dropped from the state, never a reason not to serve the live model."""
        saved = self.state.store.read_candidate()
        if saved is None:
            return
        live = self.state.model
        try:
            if live is not None and live.bundle.sha256 == saved["sha256"]:
                raise BundleError("it is the live bundle already (a promotion was cut short)")
            model = self.state._load_stored(saved["sha256"])
            options = parse_options(saved.get("mode"), str(saved.get("fraction", "")), saved.get("sticky"))
        except (BundleError, ApiError) as exc:
            log.error("candidate %s not restored, dropped: %s", saved["sha256"][:12], exc)
            with self.state._admin:
                self.state.store.write_candidate(None)
            return
        self._set(Candidate(model, **options))
        log.info("candidate %s version %s restored (%s)", model.name, model.version, options["mode"])

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=10)
            self._thread = None

    def _set(self, candidate: Candidate | None) -> None:
        self.current = candidate
        if candidate is not None and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="edge-shadow", daemon=True)
            self._thread.start()

    # -- admin

    def install(self, source: Path, work: Path, options: dict[str, Any]) -> dict[str, Any]:
        """Stage, verify, load and golden-check like an upload; held beside the live model, not swapped in."""
        state = self.state
        with state._checking:
            bundle = state._stage(source, work / "bundle")
            live, held = state.model, self.current
            if live is not None and live.bundle.sha256 == bundle.sha256:
                raise ApiError(409, "this bundle is the live model already: nothing to try beside it")
            if held is not None and held.model.bundle.sha256 == bundle.sha256:
                if held.options == options:
                    return self.describe_change("unchanged")  # a retried call keeps the figures gathered so far
                model = held.model
            else:
                model = state._load(bundle)
            if live is not None and model.modality != live.modality:
                raise BundleError(f"candidate takes {model.modality} inputs, the live model {live.modality}")
            with state._admin:
                final = state.store.adopt(bundle.root, bundle.sha256)
                model = replace(model, bundle=replace(model.bundle, root=final))
                state.store.write_candidate({"sha256": bundle.sha256, **options})
                self._set(Candidate(model, **options))
                state.store.prune(set())
        log.info("candidate %s version %s installed (%s)", model.name, model.version, options)
        return self.describe_change("installed")

    def promote(self) -> dict[str, Any]:
        """The candidate becomes current, the old current previous: one write of state.json, then the swap."""
        state = self.state
        with state._admin:
            held = self._require()
            new = held.model.bundle.sha256
            old = state._pointer("current")
            previous = old if old is not None and old != new else state._pointer("previous")
            state.store.write_state(new, previous, candidate=None)
            state.model, state.error = held.model, None
            self._set(None)
            state.metrics.observe_load("candidate", "loaded")
            state.store.prune({new, previous})
        log.info("candidate promoted: serving %s version %s", held.model.name, held.model.version)
        return state.describe_change("promoted", held.model) | {"figures": self.figures(held)}

    def drop(self) -> dict[str, Any]:
        state = self.state
        with state._admin:
            held = self._require()
            state.store.write_candidate(None)
            self._set(None)
            state.store.prune(set())
        log.info("candidate %s version %s dropped", held.model.name, held.model.version)
        return {"status": "dropped", "version": held.model.version, "bundle_sha256": held.model.bundle.sha256}

    def _require(self) -> Candidate:
        if self.current is None:
            raise LookupError("no candidate installed")
        return self.current

    # -- the request path

    def route(self, headers: Mapping[str, str], live: LoadedModel) -> tuple[LoadedModel, str, Candidate | None]:
        """Which model answers: the candidate for the canary's share (by a hash of the sticky header when the
        request has it, else at random), the live model otherwise."""
        held = self.current
        if held is None or held.mode != "canary" or held.fraction <= 0:
            return live, "live", held
        key = headers.get(held.sticky) if held.sticky else None
        if key is not None:
            digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
            draw = int.from_bytes(digest, "big") / 2**64
        else:
            draw = random.random()
        return (held.model, "candidate", held) if draw < held.fraction else (live, "live", held)

    @contextlib.contextmanager
    def serving(self, held: Candidate | None, role: str) -> Iterator[dict[str, float]]:
        """Around the model call of one request: its latency, or an error that is not the client's fault."""
        timing: dict[str, float] = {}
        try:
            yield timing
        except ApiError as exc:
            if held is not None and exc.status >= 500 and "overloaded" not in exc.message:
                (held.stats if role == "candidate" else held.live).observe(None, error=True)
            raise
        except Exception:
            if held is not None:
                (held.stats if role == "candidate" else held.live).observe(None, error=True)
            raise
        if held is not None:
            (held.stats if role == "candidate" else held.live).observe(timing.get("seconds"))

    def mirror(self, held: Candidate | None, role: str, answered_by: LoadedModel, parsed: dict, logits: Any) -> None:
        """A copy of the request's inputs to the model that did not answer; never blocks, drops when full."""
        if held is None or (held.mode == "canary" and role == "live"):
            return  # a canary's live answers need no second opinion: the candidate's are checked by the live model
        other, other_role = (held.model, "candidate") if role == "live" else (self.state.model, "live")
        if other is None:
            return
        prepared = parsed["prepared"]
        n = len(prepared)
        same = _prep_key(other) == _prep_key(answered_by)
        with self._lock:
            if self._queued + n > SHADOW_MAX_ITEMS:
                held.dropped += 1
                return
            self._queued += n
        top = [answered_by.labels[int(i)] for i in np.argmax(logits, axis=1)]
        items = None if same else parsed.get("items")
        if not same and items is None:
            with self._lock:
                self._queued -= n
            return
        self._queue.put(_Job(held, other, answered_by, other_role, prepared if same else None, items, top))

    def _run(self) -> None:
        with contextlib.suppress(OSError, AttributeError):  # Linux: this thread only, niceness relative to the process
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + SHADOW_NICE))
        while (job := self._queue.get()) is not None:
            n = len(job.prepared if job.prepared is not None else job.items or [])
            try:
                if job.candidate is self.current:
                    self._wait_for_quiet()
                    self._score(job)
            except Exception as exc:  # a failing candidate is a figure, never a crash of the worker
                if job.role == "candidate":
                    job.candidate.stats.observe(None, error=True)
                log.debug("shadow call failed: %s", exc)
            finally:
                with self._lock:
                    self._queued -= n

    def _wait_for_quiet(self) -> None:
        """Live requests first: while some are being prepared or queued for the batcher, wait (at most
        `QUIET_WAIT_S`, so a busy server still gets its copies scored or, when the queue fills, dropped)."""
        batcher, deadline = self.state.batcher, time.monotonic() + QUIET_WAIT_S
        while (batcher._arriving or batcher._pending) and time.monotonic() < deadline:
            time.sleep(0.0005)

    def _score(self, job: _Job) -> None:
        began = time.perf_counter()
        prepared = job.prepared if job.prepared is not None else job.model.prepare(job.items or [])
        logits = job.model.logits(prepared)
        seconds = time.perf_counter() - began
        if job.role == "candidate":
            job.candidate.stats.observe(seconds)
            if job.candidate.stats.requests % PAIR_EVERY == 1:
                began = time.perf_counter()
                job.answered_by.logits(job.prepared if job.prepared is not None else job.answered_by.prepare(job.items))
                job.candidate.paired.observe(time.perf_counter() - began)
        top = [job.model.labels[int(i)] for i in np.argmax(logits, axis=1)]
        with self._lock:
            job.candidate.compared += len(top)
            job.candidate.agreed += sum(a == b for a, b in zip(top, job.answered, strict=True))

    # -- what it reports

    def figures(self, held: Candidate) -> dict[str, Any]:
        live = self.state.model
        mine = held.stats.figures(held.model.version)
        theirs = (held.paired if held.mode == "shadow" else held.live).figures("")
        ratio = mine["p95_ms"] / theirs["p95_ms"] if mine["p95_ms"] and theirs["p95_ms"] else None
        return {
            "watched_s": round(time.monotonic() - held.since, 3),
            "compared": held.compared,
            "agreement": held.agreed / held.compared if held.compared else None,
            "dropped": held.dropped,
            "p95_ratio": None if ratio is None else round(ratio, 3),
            "candidate": mine,
            "live": held.live.figures(live.version if live is not None else ""),
        }

    def describe(self) -> dict[str, Any] | None:
        held = self.current
        if held is None:
            return None
        model = held.model
        return {
            "name": model.name,
            "version": model.version,
            "bundle_sha256": model.bundle.sha256,
            "installed_at": held.installed_at,
            **held.options,
            "figures": self.figures(held),
        }

    def describe_change(self, status: str) -> dict[str, Any]:
        return {"status": status, "candidate": self.describe()}
