"""Drift the edge can see: the one definition of the per-input statistics, their fixed bins, and the population
stability index (PSI) of live traffic against the bundle's reference, used by the exporter (which writes the
reference, `reference_stats.json`, from the test split) and by the server (which counts live inputs into the
same bins). One definition, so export and serving cannot disagree.

Statistics, one value per input:
- text:  `length_tokens` (token ids the model sees: special tokens included, after truncation),
         `unknown_rate` (share of those ids that are the tokenizer's unknown token; 0 for a tokenizer without one),
- image: `pixels` (width x height of the decoded input, before resizing),
         `brightness` (mean intensity in [0, 1] of the resized image before normalisation),
- both:  `predicted_class` (one bin per class), `confidence` (softmax probability of the top class).

Numeric bins: interior edges at the reference's deciles (duplicates merged), open at both ends, so any live value
falls in a bin. PSI = sum((a - e) * ln(a / e)) over bins, each proportion floored at `PSI_FLOOR` so an empty bin
stays finite. Hand-written with numpy: the libraries that have PSI (evidently, nannyml, popmon) bring pandas and
more into a torch-free edge box and compute on whole data frames, not on fixed-bin counters updated per batch.

The server keeps counts only (no per-request storage): a few integer arrays per model version, reset with it.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from transflow_edge.bundle import Bundle, BundleError

log = logging.getLogger("transflow.edge")

REFERENCE = "reference_stats.json"
REFERENCE_FORMAT = "transflow-drift-reference"
REFERENCE_VERSION = 1
IDENTITY = [REFERENCE_FORMAT, REFERENCE_VERSION]
MAX_REFERENCE_BYTES = 1 << 20
MAX_NUMERIC_EDGES = 63  # at most 64 bins per numeric statistic
MAX_CLASSES = 4096
PSI_FLOOR = 1e-4
DEFAULT_BINS = 10
WINDOW = 2000  # a score covers the last 1,000 to 2,000 live inputs; see DriftTracker
STATISTICS = {
    "text": ("length_tokens", "unknown_rate", "predicted_class", "confidence"),
    "image": ("pixels", "brightness", "predicted_class", "confidence"),
}
INPUT_STATISTICS = {"length_tokens", "unknown_rate", "pixels", "brightness"}
ALL_STATISTICS = frozenset(s for names in STATISTICS.values() for s in names)  # the metrics' bounded label set


def psi(expected: np.ndarray, actual_counts: np.ndarray, floor: float = PSI_FLOOR) -> float:
    """PSI of observed counts against reference proportions over the same bins; nan before any observation."""
    total = float(np.sum(actual_counts))
    if total <= 0:
        return math.nan
    e = np.maximum(np.asarray(expected, dtype=np.float64), floor)
    a = np.maximum(np.asarray(actual_counts, dtype=np.float64) / total, floor)
    return float(np.sum((a - e) * np.log(a / e)))


# ---------------------------------------------------------------- the statistics


def unknown_token_id(preprocessor: Any) -> int | None:
    """The tokenizer's unknown token id (WordPiece, BPE or Unigram with one), else None."""
    model = preprocessor.tokenizer.model
    token = getattr(model, "unk_token", None)
    if token is None and getattr(model, "unk_id", None) is not None:
        return int(model.unk_id)
    return None if token is None else preprocessor.tokenizer.token_to_id(token)


def input_values(
    preprocessor: Any, prepared: Sequence[Any], sizes: Sequence[int] = (), unk: int | None = None
) -> dict[str, np.ndarray]:
    """The input statistics of prepared items (`preprocessor.prepare`'s output). Text needs the unknown token's
    id (`unknown_token_id`); images the decoded sizes (width x height), which preparing throws away."""
    if preprocessor.modality == "text":
        lengths = np.fromiter((len(ids) for ids, _ in prepared), dtype=np.float64, count=len(prepared))
        unknown = np.fromiter(
            (float(np.count_nonzero(ids == unk)) if unk is not None else 0.0 for ids, _ in prepared),
            dtype=np.float64,
            count=len(prepared),
        )
        return {"length_tokens": lengths, "unknown_rate": unknown / np.maximum(lengths, 1)}
    # brightness before normalisation: normalised = (x - mean) / std per channel, and the mean is linear in x
    channels = len(preprocessor.std)
    means = np.asarray([chw.mean(axis=(1, 2), dtype=np.float64) for chw in prepared]).reshape(-1, channels)
    raw = means * preprocessor.std.reshape(1, -1) + preprocessor.mean.reshape(1, -1)
    return {"pixels": np.asarray(sizes, dtype=np.float64), "brightness": raw.mean(axis=1)}


def output_values(logits: np.ndarray) -> dict[str, np.ndarray]:
    """Predicted class and top-class softmax probability of each row of logits."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return {"predicted_class": z.argmax(axis=-1).astype(np.float64), "confidence": 1.0 / e.sum(axis=-1)}


def bin_index(name: str, values: np.ndarray, edges: np.ndarray | None) -> np.ndarray:
    """The bin of each value: (-inf, e1], (e1, e2], …, (ek, inf) by the statistic's edges; a class per bin."""
    if name == "predicted_class":
        return values.astype(np.int64)
    return np.searchsorted(edges, values, side="left")


def bin_counts(name: str, values: np.ndarray, edges: np.ndarray | None, classes: int) -> np.ndarray:
    """Counts of `values` in the statistic's fixed bins (`bin_index`)."""
    size = classes if name == "predicted_class" else len(edges) + 1  # type: ignore[arg-type]
    return np.bincount(bin_index(name, values, edges), minlength=size)[:size]


# ---------------------------------------------------------------- the reference (written at export)


def build_reference(values: dict[str, np.ndarray], modality: str, classes: int, bins: int = DEFAULT_BINS) -> dict:
    """The reference file's content from per-item values of the test split: edges (deciles) and proportions."""
    stats: dict[str, Any] = {}
    for name in STATISTICS[modality]:
        v = np.asarray(values[name], dtype=np.float64)
        if not len(v):
            raise ValueError("no reference items")
        edges = None
        if name != "predicted_class":
            edges = np.unique(np.quantile(v, np.linspace(0, 1, bins + 1)[1:-1]))
        counts = bin_counts(name, v, edges, classes)
        entry = {"proportions": [round(float(c) / len(v), 8) for c in counts]}
        stats[name] = entry if edges is None else {"edges": [float(x) for x in edges], **entry}
    return {"format": REFERENCE_FORMAT, "format_version": REFERENCE_VERSION, "modality": modality,
            "count": len(next(iter(values.values()))), "statistics": stats}  # fmt: skip


@dataclass(frozen=True)
class Reference:
    modality: str
    count: int
    edges: dict[str, np.ndarray | None]
    proportions: dict[str, np.ndarray]


def _finite_list(value: Any, where: str, limit: int) -> np.ndarray:
    if not isinstance(value, list) or not 1 <= len(value) <= limit:
        raise BundleError(f"{where} must be a list of 1..{limit} numbers")
    if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in value):
        raise BundleError(f"{where} must hold numbers only")
    array = np.asarray(value, dtype=np.float64)
    if not np.isfinite(array).all():
        raise BundleError(f"{where} must hold finite numbers")
    return array


def check_reference(raw: Any, modality: str, classes: int) -> Reference:
    """The reference file's content, validated like any bundle content: a BundleError naming the bad field."""
    if not isinstance(raw, dict) or [raw.get("format"), raw.get("format_version")] != IDENTITY:
        raise BundleError(f"{REFERENCE}: format must be {REFERENCE_FORMAT!r} version {REFERENCE_VERSION}")
    if raw.get("modality") != modality:
        raise BundleError(f"{REFERENCE}: modality {raw.get('modality')!r:.40} but the bundle is {modality!r}")
    count = raw.get("count")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise BundleError(f"{REFERENCE}: count must be a positive integer")
    stats = raw.get("statistics")
    if not isinstance(stats, dict) or set(stats) != set(STATISTICS[modality]):
        raise BundleError(f"{REFERENCE}: statistics must be exactly {list(STATISTICS[modality])}")
    edges: dict[str, np.ndarray | None] = {}
    proportions: dict[str, np.ndarray] = {}
    for name in STATISTICS[modality]:
        entry, where = stats[name], f"{REFERENCE}: statistics.{name}"
        if not isinstance(entry, dict):
            raise BundleError(f"{where} must be an object")
        if name == "predicted_class":
            edges[name], want = None, classes
        else:
            edges[name] = _finite_list(entry.get("edges"), f"{where}.edges", MAX_NUMERIC_EDGES)
            if np.any(np.diff(edges[name]) <= 0):
                raise BundleError(f"{where}.edges must be strictly increasing")
            want = len(edges[name]) + 1
        p = _finite_list(entry.get("proportions"), f"{where}.proportions", MAX_CLASSES)
        if len(p) != want:
            raise BundleError(f"{where}.proportions must have {want} entries (one per bin), not {len(p)}")
        if np.any(p < 0) or abs(float(p.sum()) - 1.0) > 1e-3:
            raise BundleError(f"{where}.proportions must be non-negative and sum to 1")
        proportions[name] = p / p.sum()
    return Reference(modality, count, edges, proportions)


def load_reference(bundle: Bundle, modality: str, classes: int) -> Reference | None:
    """The bundle's reference statistics, or None for a bundle exported without them (drift unavailable)."""
    entry = bundle.manifest.get("files", {}).get(REFERENCE)
    if entry is None:
        return None
    if entry["size"] > MAX_REFERENCE_BYTES:
        raise BundleError(f"{REFERENCE}: {entry['size']} bytes (limit {MAX_REFERENCE_BYTES})")
    if classes > MAX_CLASSES:
        raise BundleError(f"{REFERENCE}: drift tracks at most {MAX_CLASSES} classes, the model has {classes}")
    try:
        raw = json.loads(bundle.path(REFERENCE).read_bytes())
    except (OSError, ValueError, RecursionError) as exc:
        raise BundleError(f"{REFERENCE}: not readable JSON ({type(exc).__name__})") from None
    return check_reference(raw, modality, classes)


# ---------------------------------------------------------------- the server's counters


class DriftTracker:
    """Fixed-size counts of one model version's live traffic in its reference's bins; thread-safe, O(bins).

    Scores cover the recent past, not everything since the version loaded (a shift after a month of steady
    traffic must still show): two generations of counts per statistic, the newer replacing the older once it
    holds `window / 2` inputs, so a score always covers the last `window / 2` to `window` inputs. `total` counts
    everything since the version loaded."""

    def __init__(self, reference: Reference, preprocessor: Any, window: int = WINDOW) -> None:
        self.reference, self.preprocessor, self.half = reference, preprocessor, max(1, window // 2)
        self._unk = unknown_token_id(preprocessor) if preprocessor.modality == "text" else None
        self.started = time.time()
        self._classes = len(reference.proportions["predicted_class"])
        zeros = {name: np.zeros(len(p), dtype=np.int64) for name, p in reference.proportions.items()}
        self._newer = {name: z.copy() for name, z in zeros.items()}
        self._older = zeros
        self._total = dict.fromkeys(zeros, 0)
        self._fill = dict.fromkeys(zeros, 0)  # inputs in the newer generation
        self.errors = 0
        self._lock = threading.Lock()

    def observe(self, values: dict[str, np.ndarray]) -> None:
        """Count a batch's values (a few µs: one searchsorted per statistic, increments in place)."""
        binned = [
            (name, bin_index(name, v, self.reference.edges[name]).tolist())
            for name, v in values.items()
            if name in self._newer and len(v)
        ]
        with self._lock:
            for name, bins in binned:
                newer = self._newer[name]
                for b in bins:  # a request's handful of values: faster than np.add.at or a bincount
                    newer[b] += 1
                self._total[name] += len(bins)
                self._fill[name] += len(bins)
                if self._fill[name] >= self.half:
                    self._older[name], self._newer[name], self._fill[name] = newer, np.zeros_like(newer), 0

    def observe_inputs(self, prepared: Sequence[Any], sizes: Sequence[int] = ()) -> None:
        self._safely(lambda: input_values(self.preprocessor, prepared, sizes, self._unk))

    def observe_outputs(self, logits: np.ndarray) -> None:
        self._safely(lambda: output_values(logits))

    def _safely(self, values: Callable[[], dict[str, np.ndarray]]) -> None:
        """Counting never fails a request: an error is counted and logged once, the answer goes out regardless."""
        try:
            self.observe(values())
        except Exception:
            self.errors += 1
            if self.errors == 1:
                log.exception("drift tracking failed (counted in /v1/drift 'errors'; the requests are unaffected)")

    def snapshot(self) -> dict[str, Any]:
        """Per statistic: PSI and observations over the window, the window's counts and the reference (so a fleet
        can add counts up), and the total since the version loaded."""
        with self._lock:
            counts = {name: self._newer[name] + self._older[name] for name in self._newer}
            totals = dict(self._total)
        stats = {}
        for name, c in counts.items():
            edges = self.reference.edges[name]
            value = psi(self.reference.proportions[name], c)
            stats[name] = {
                "psi": None if math.isnan(value) else round(value, 6),
                "count": int(c.sum()),
                "total": totals[name],
                "counts": c.tolist(),
                "reference": [round(float(x), 8) for x in self.reference.proportions[name]],
                **({} if edges is None else {"edges": edges.tolist()}),
            }
        return {"available": True, "since": self.started, "reference_count": self.reference.count,
                "window": 2 * self.half, "floor": PSI_FLOOR, "errors": self.errors, "statistics": stats}  # fmt: skip


def describe(model: Any) -> dict[str, Any]:
    """`GET /v1/drift`: the served version's drift figures, or why there are none."""
    head = {"name": model.name, "version": model.version, "bundle_sha256": model.bundle.sha256}
    tracker = getattr(model, "drift", None)
    if tracker is None:
        return head | {"available": False, "reason": f"the bundle has no {REFERENCE} (exported before drift tracking)"}
    return head | tracker.snapshot()


class DriftCollector:
    """Prometheus collector: PSI and observations per statistic of the model `current()` returns (label set:
    the fixed statistic names, one model at a time)."""

    def __init__(self, current: Callable[[], Any]) -> None:
        self.current = current

    def describe(self) -> list:
        return []  # unchecked collector: the series depend on the model served at collect time

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        model = self.current()
        tracker = getattr(model, "drift", None)
        available = GaugeMetricFamily(
            "transflow_edge_drift_available", "1 when the served bundle carries reference statistics."
        )
        available.add_metric([], float(tracker is not None))
        yield available
        if tracker is None:
            return
        score = GaugeMetricFamily(
            "transflow_edge_drift_psi", "Population stability index of live traffic vs the bundle's reference.",
            labels=["statistic"],
        )  # fmt: skip
        seen = GaugeMetricFamily(
            "transflow_edge_drift_observations", "Live inputs counted per statistic since the version loaded.",
            labels=["statistic"],
        )  # fmt: skip
        for name, figures in tracker.snapshot()["statistics"].items():
            score.add_metric([name], math.nan if figures["psi"] is None else figures["psi"])
            seen.add_metric([name], figures["count"])
        yield score
        yield seen
