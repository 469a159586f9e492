"""The int8 export ladder: try dynamic int8 → static int8 (QDQ, calibrated on a seeded slice of the validation split)
→ static int8 with the most outlier-prone nodes kept in float. `pick="fastest"` (the default) tries every rung and
ships the one fastest at batch 1 here among those that keep both the macro-F1 budget and the per-class budget, fp32
included: which graph is fastest depends on the CPU and the model (on the 2-core EPYC here, a small ViT's dynamic
int8 ran at 2.2× fp32's latency and its static int8 at 0.8×). `pick="first"` stops at the first rung within both
budgets and ships it whatever its speed. Every rung tried is reported (accuracy, worst class drop, batch-1 latency),
and the calibration slice's hash goes into the lineage.

Pure ONNX + numpy: the caller hands in feeds (input name → array) and labels, so this works for any modality and
for synthetic models in tests. Quantisation is onnxruntime.quantization (quantize_dynamic, quantize_static with
a CalibrationDataReader, nodes_to_exclude).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from sklearn.metrics import f1_score

Feeds = dict[str, np.ndarray]
RUNGS = ("dynamic", "static", "static_mixed")
QUANTISABLE = ("MatMul", "Gemm", "Conv")
MIXED_STEPS = (1, 3, 8)  # how many of the most outlier-prone nodes stay float, tried in turn


@dataclass
class Rung:
    rung: str
    macro_f1: float | None = None
    accuracy: float | None = None
    macro_drop_pt: float | None = None
    worst_class: str | None = None
    worst_class_drop_pt: float | None = None
    per_class_drop_pt: dict[str, float] = field(default_factory=dict)
    latency_b1_ms: float | None = None
    passed: bool = False
    verdict: str = ""
    shipped: bool = False
    excluded_nodes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    file: str | None = None


class FeedReader(CalibrationDataReader):
    """onnxruntime's calibration protocol over a fixed list of feeds (one batch each)."""

    def __init__(self, feeds: Sequence[Feeds]):
        self.feeds = list(feeds)
        self._it: Iterator[Feeds] = iter(self.feeds)

    def get_next(self) -> Feeds | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self.feeds)


def calibration_slice(n_items: int, size: int, seed: int) -> list[int]:
    """A seeded random slice of the validation split (sorted indices): the same seed, the same slice."""
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(n_items, size=min(size, n_items), replace=False).tolist())


def feeds_hash(feeds: Sequence[Feeds]) -> str:
    """sha256 over the calibration tensors themselves (name, dtype, shape, bytes): what the quantiser saw."""
    digest = hashlib.sha256()
    for feed in feeds:
        for name in sorted(feed):
            a = np.ascontiguousarray(feed[name])
            digest.update(f"{name}|{a.dtype}|{a.shape}|".encode())
            digest.update(a.tobytes())
    return digest.hexdigest()


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def predict(path: Path, batches: Sequence[Feeds], output: str = "logits") -> np.ndarray:
    sess = _session(path)
    return np.concatenate([sess.run([output], feed)[0] for feed in batches]).argmax(-1)


def batch1_latency(path: Path, feed: Feeds, repeats: int = 20) -> float:
    sess = _session(path)
    for _ in range(3):
        sess.run(None, feed)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        sess.run(None, feed)
        times.append(1000 * (time.perf_counter() - started))
    return round(float(np.median(times)), 3)


def outlier_ranking(model_path: Path, calibration: Sequence[Feeds], limit: int = 16) -> list[str]:
    """Quantisable nodes ordered by how badly per-tensor int8 fits their input: peak |x| over mean |x| of the float
    activation on the calibration slice. A few huge values (outlier features, as Transformers grow) stretch the
    int8 scale until the small values that carry a class round to zero; keeping those nodes in float is what
    rescues accuracy. (Output SQNR misses exactly this: the outliers dominate the signal energy.)"""
    model = onnx.load(str(model_path))
    initialisers = {i.name for i in model.graph.initializer}
    consumers: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.op_type in QUANTISABLE and node.input and node.input[0] not in initialisers:
            consumers.setdefault(node.input[0], []).append(node.name)
    known = {o.name for o in model.graph.output}
    for name in consumers:
        if name not in known:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = list(consumers)
    peak, mean = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
    for feed in calibration:
        for name, value in zip(names, sess.run(names, feed), strict=True):
            magnitude = np.abs(value.astype(np.float64))
            peak[name] = max(peak[name], float(magnitude.max()))
            mean[name] += float(magnitude.mean()) / len(calibration)
    ranked = sorted(names, key=lambda n: -peak[n] / (mean[n] + 1e-12))
    return [node for tensor in ranked for node in consumers[tensor]][:limit]


def judge(
    rung: Rung, y: np.ndarray, pred: np.ndarray, fp32_f1: np.ndarray, classes: list[str], macro_budget: float,
    class_budget: float | None,
) -> Rung:  # fmt: skip
    f1 = f1_score(y, pred, labels=list(range(len(classes))), average=None, zero_division=0)
    drops = 100 * (fp32_f1 - f1)
    worst = int(np.argmax(drops))
    rung.macro_f1, rung.accuracy = float(f1.mean()), float(np.mean(pred == y))
    rung.macro_drop_pt = round(float(100 * (fp32_f1.mean() - f1.mean())), 3)
    rung.worst_class, rung.worst_class_drop_pt = classes[worst], round(float(drops[worst]), 3)
    rung.per_class_drop_pt = {c: round(float(d), 3) for c, d in zip(classes, drops, strict=True)}
    macro_ok = rung.macro_drop_pt <= macro_budget
    class_ok = class_budget is None or rung.worst_class_drop_pt <= class_budget
    rung.passed = macro_ok and class_ok
    within = "within" if macro_ok else "exceeds"
    parts = [f"macro-F1 drop {rung.macro_drop_pt:.2f} pt {within} budget {macro_budget} pt"]
    if class_budget is not None:
        parts.append(f"worst class {rung.worst_class} drop {rung.worst_class_drop_pt:.2f} pt "
                     f"{'within' if class_ok else 'exceeds'} class budget {class_budget} pt")  # fmt: skip
    rung.verdict = "; ".join(parts)
    return rung


def run_ladder(
    fp32_path: Path,
    raw_path: Path,
    work: Path,
    test_batches: Sequence[Feeds],
    y: np.ndarray,
    fp32_pred: np.ndarray,
    classes: list[str],
    calibration: Sequence[Feeds],
    macro_budget: float,
    class_budget: float | None,
    rungs: Sequence[str] = RUNGS,
    try_all: bool = False,
    pick: str = "fastest",
) -> dict[str, Any]:
    """Walk the ladder; returns {"rungs": [...], "shipped": rung name or "fp32", "file": path or None, ...}.

    Dynamic int8 quantises the optimised fp32 graph (weights per channel, activations at run time); the static
    rungs quantise the unoptimised export (`raw_path`, what onnxruntime's QDQ tooling expects) and let the session
    fuse the QDQ pairs at load. `try_all` evaluates every rung even after one passes (always, with
    `pick="fastest"`: every passing rung and fp32 compete on latency)."""
    if pick not in ("fastest", "first"):
        raise ValueError(f"pick must be 'fastest' or 'first', not {pick!r}")
    y = np.asarray(y)
    try_all = try_all or pick == "fastest"  # speed is only known once measured
    fp32_f1 = f1_score(y, fp32_pred, labels=list(range(len(classes))), average=None, zero_division=0)
    out: list[Rung] = []
    shipped: Rung | None = None
    reader = FeedReader(calibration)
    for name in rungs:
        if shipped is not None and not try_all:
            break
        attempts: list[tuple[str, list[str]]] = [(name, [])]
        if name in ("static", "static_mixed") and not calibration:
            out.append(Rung(name, verdict="skipped: no calibration data (validation split) given"))
            continue
        if name == "static_mixed":
            ranking = outlier_ranking(raw_path, calibration[:8])
            attempts = [(f"static_mixed[{k}]", ranking[:k]) for k in MIXED_STEPS if k <= len(ranking)]
        for label, exclude in attempts:
            started = time.perf_counter()
            path = work / f"ladder-{label.replace('[', '-').rstrip(']')}.onnx"
            if name == "dynamic":
                quantize_dynamic(str(fp32_path), str(path), weight_type=QuantType.QInt8, per_channel=True)
            else:
                reader.rewind()
                quantize_static(
                    str(raw_path), str(path), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=exclude or None,
                    op_types_to_quantize=list(QUANTISABLE),
                )  # fmt: skip
            rung = judge(Rung(label, excluded_nodes=exclude), y, predict(path, test_batches), fp32_f1, classes,
                         macro_budget, class_budget)  # fmt: skip
            rung.latency_b1_ms = batch1_latency(path, _first_row(test_batches[0]))
            rung.seconds, rung.file = round(time.perf_counter() - started, 2), str(path)
            out.append(rung)
            if rung.passed and shipped is None:
                shipped = rung
                if not try_all:
                    break
    fp32 = Rung("fp32", macro_f1=float(fp32_f1.mean()), accuracy=float(np.mean(fp32_pred == y)), macro_drop_pt=0.0,
                worst_class_drop_pt=0.0, passed=True, verdict="reference",
                latency_b1_ms=batch1_latency(fp32_path, _first_row(test_batches[0])), file=str(fp32_path))  # fmt: skip
    out.append(fp32)
    passing = [r for r in out if r.passed]
    winner = (shipped or fp32) if pick == "first" else min(passing, key=lambda r: r.latency_b1_ms or float("inf"))
    winner.shipped = True
    if winner is fp32 and shipped is None:
        tried = "; ".join(f"{r.rung}: {r.verdict}" for r in out[:-1])
        reason = f"fp32 ships: no int8 rung kept the budgets ({tried})"
    elif winner is fp32:  # the fastest int8 rung within the budgets still lost to fp32
        best = min((r for r in passing if r is not fp32), key=lambda r: r.latency_b1_ms or float("inf"))
        reason = (f"fp32 ships: {best.rung} kept the budgets ({best.verdict}) but is slower at batch 1 here "
                  f"({best.latency_b1_ms:.3f} ms vs fp32 {fp32.latency_b1_ms:.3f} ms)")  # fmt: skip
    else:
        speed = f"; batch 1 {winner.latency_b1_ms:.3f} ms vs fp32 {fp32.latency_b1_ms:.3f} ms"
        reason = f"{winner.rung} ships: {winner.verdict}{speed}"
    return {"rungs": [asdict(r) for r in out], "shipped": winner.rung, "file": None if winner is fp32 else winner.file,
            "reason": reason, "macro_budget_pt": macro_budget, "class_budget_pt": class_budget,
            "pick": pick}  # fmt: skip


def _first_row(feed: Feeds) -> Feeds:
    return {k: v[:1] for k, v in feed.items()}
