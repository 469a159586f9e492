"""Distilling a registered version into a shallower student: load the teacher, cache its logits, train the
student, measure both shipped ONNX files side by side, and decide whether the student may ship.

The student is judged the way an int8 rung is (`tasks.export_ladder.judge`): its predictions against the
teacher's on the same test split, within the macro-F1 and per-class budgets; plus its run's baselines, and a
batch-1 speed-up of at least `export.distill_min_speedup`. Only a student that passes all three takes the
`challenger` alias; every student is registered (alias `distilled`) so a refusal can be inspected.
"""

from __future__ import annotations

import hashlib
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import f1_score

from models.adapters import load_model_dir
from models.backbone import Adapter, TransferModel
from models.batching import Batches, shuffled
from models.distill import DistillResult, distill, make_student
from models.trainer import predict, seed_everything
from runconfig import ConfigError, RunConfig, apply_override
from tasks.data import Dataset, load_dataset
from tasks.export_ladder import Feeds, Rung, batch1_latency, judge
from tasks.export_ladder import predict as onnx_predict
from tasks.finetune import Encoded, encode_splits
from tasks.registered_version import fetch_verified_bundle, require_version, run_config, verify_same_data
from tasks.tracking import Tracker, VersionRecord

DISTILLED = "distilled"  # the newest student, shipped or not; `challenger` only when it ships
TEACHER_LOGITS = "teacher-train-logits.npy"


@dataclass
class Teacher:
    record: VersionRecord
    cfg: RunConfig  # the teacher's run config with the distill command's overrides applied
    adapter: Adapter
    model: TransferModel
    classes: list[str]
    dataset: Dataset
    encoded: Encoded


def with_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """The teacher's run config with `--set KEY=VALUE` overrides (distill.*, export.*, training.*), validated."""
    tree = cfg.resolved()
    for assignment in overrides:
        apply_override(tree, assignment)
    try:
        return RunConfig.model_validate(tree)
    except ValueError as exc:
        raise ConfigError(f"distill overrides {overrides}: {exc}") from None


def load_teacher(tracker: Tracker, name: str, version: str, overrides: list[str], work: Path) -> Teacher:
    """The registered version's training-format model, its run config and its data (checked to be the same)."""
    record = require_version(tracker, name, version)
    cfg = with_overrides(run_config(tracker, record, work / "teacher"), overrides)
    verify_same_data(cfg.data, record, allow_unversioned=True)
    source = tracker.training_model_uri(f"models:/{name}/{version}")  # the run's model/, not the pyfunc
    adapter, model, meta = load_model_dir(tracker.download(source, work / "teacher"))
    dataset = load_dataset(cfg.data, seed=cfg.training.seed)
    return Teacher(record, cfg, adapter, model, meta["classes"], dataset, encode_splits(adapter, dataset))


def teacher_logits(teacher: Teacher, cache_dir: Path, device: str) -> torch.Tensor:
    """The teacher's logits over the training split, in the split's order; computed once per teacher version and
    data version (a re-run with other distill settings reads them back)."""
    _, labels = teacher.encoded.train
    key = f"{teacher.record.name}/{teacher.record.version}/{teacher.record.tags.get('data_version')}/{len(labels)}"
    path = cache_dir / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}-{TEACHER_LOGITS}"
    if path.is_file():
        return torch.from_numpy(np.load(path, allow_pickle=False))
    batches = teacher.encoded.batches(teacher.adapter, "train", teacher.cfg.training.eval_batch_size, sort=True)
    logits, _, _ = predict(teacher.model.to(device), batches, device, title="teacher logits")
    ordered = np.empty_like(logits)
    ordered[np.asarray(batches.order)] = logits  # length-sorted for speed, stored back in the split's order
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, ordered, allow_pickle=False)
    return torch.from_numpy(ordered)


def train_student(
    teacher: Teacher, logits: torch.Tensor, device: str, log: Any = None
) -> tuple[TransferModel, list[int], DistillResult]:
    """Cut the student from the teacher and distil it (no augmentation: the cached logits are of clean inputs)."""
    d, seed = teacher.cfg.distill, teacher.cfg.training.seed
    seed_everything(seed)
    try:
        student, layers = make_student(teacher.model, d.layers)
    except ValueError as exc:  # e.g. more layers than the teacher has: a config error, not a crash
        raise ConfigError(f"distill.layers={d.layers}: {exc}") from None
    examples, labels = teacher.encoded.train
    index = list(range(len(labels)))  # the batches' "labels" are example indices into the logit cache

    def train(epoch: int) -> Batches:
        collate = lambda rows: teacher.adapter.collate(rows, False)  # noqa: E731
        return Batches(examples, index, d.batch_size, collate, shuffled(len(index), seed + epoch))

    val = teacher.encoded.batches(teacher.adapter, "validation", teacher.cfg.training.eval_batch_size, sort=True)
    result = distill(
        student, train, logits, torch.as_tensor(labels), val, steps=d.steps, lr=d.lr, temperature=d.temperature,
        alpha=d.alpha, eval_rounds=d.eval_rounds, device=device, metric=teacher.cfg.evaluation.metric, log=log,
    )  # fmt: skip
    return student.cpu(), layers, result


def test_feeds(teacher: Teacher) -> tuple[list[Feeds], np.ndarray, Feeds]:
    """The test split as ONNX feeds (length-sorted batches), its labels in that order, and a batch-1 feed."""
    batches = teacher.encoded.batches(teacher.adapter, "test", teacher.cfg.training.eval_batch_size, sort=True)
    feeds, y = [], []
    for inputs, labels in batches:
        feeds.append({k: v.numpy() for k, v in inputs.items()})
        y.append(labels.numpy())
    first, _ = teacher.encoded.batches(teacher.adapter, "test", 1)[0]
    return feeds, np.concatenate(y), {k: v.numpy() for k, v in first.items()}


def shipped_onnx(tracker: Tracker, record: VersionRecord, work: Path) -> Path:
    """The model file the version's verified bundle ships by default (int8 rung or fp32)."""
    _, bundle = fetch_verified_bundle(tracker, record, work)
    return bundle.path(bundle.manifest["default_model"])


def side_by_side(teacher_onnx: Path, student_onnx: Path, feed: Feeds, rounds: int = 3) -> dict[str, float]:
    """Batch-1 latency of both files, alternating so a busy neighbour slows both alike; median of the rounds."""
    t, s = [], []
    for _ in range(rounds):
        t.append(batch1_latency(teacher_onnx, feed))
        s.append(batch1_latency(student_onnx, feed))
    teacher_ms, student_ms = statistics.median(t), statistics.median(s)
    return {"teacher_ms": teacher_ms, "student_ms": student_ms, "speedup": round(teacher_ms / student_ms, 3)}


def teacher_baselines(tracker: Tracker, run_id: str) -> dict[str, dict[str, float]]:
    """The baselines the teacher's run measured on this same test split (`baseline.<name>.test_<metric>`)."""
    out: dict[str, dict[str, float]] = {}
    for key, value in tracker.client.get_run(run_id).data.metrics.items():
        if key.startswith("baseline.") and ".test_" in key:
            name, metric = key.removeprefix("baseline.").rsplit(".test_", 1)
            out.setdefault(name, {})[metric] = value
    return out


def verdict(
    y: np.ndarray, teacher_pred: np.ndarray, student_pred: np.ndarray, classes: list[str], budget_pt: float,
    class_budget_pt: float | None, baseline: dict[str, Any] | None, speed: dict[str, float], min_speedup: float,
) -> dict[str, Any]:  # fmt: skip
    """Ship or not, with one line per condition: the teacher's budget, the baselines, the speed-up."""
    teacher_f1 = f1_score(y, teacher_pred, labels=list(range(len(classes))), average=None, zero_division=0)
    rung = judge(Rung("student"), y, student_pred, teacher_f1, classes, budget_pt, class_budget_pt)
    fast = speed["speedup"] >= min_speedup
    timing = f"batch-1 {speed['teacher_ms']:.3f} ms → {speed['student_ms']:.3f} ms"
    lines = [
        {
            "name": "within_teacher_budget",
            "ok": rung.passed,
            "detail": f"vs the teacher's shipped model: {rung.verdict}",
        },
        {
            "name": "beats_baselines",
            "ok": baseline is None or baseline["passed"],
            "detail": baseline["detail"] if baseline else "no baselines in the teacher's run: not compared",
        },
        {
            "name": "faster",
            "ok": fast,
            "detail": f"{timing}: {speed['speedup']:.2f}× {'≥' if fast else '<'} required {min_speedup}×",
        },
    ]
    ship = all(line["ok"] for line in lines)
    failed = [f"{line['name']}: {line['detail']}" for line in lines if not line["ok"]]
    reason = "ships: " + "; ".join(x["detail"] for x in lines) if ship else "does not ship: " + "; ".join(failed)
    rung_dict = {k: getattr(rung, k) for k in ("accuracy", "macro_f1", "macro_drop_pt", "worst_class",
                                               "worst_class_drop_pt", "per_class_drop_pt", "verdict")}  # fmt: skip
    return {"ship": ship, "reason": reason, "checks": lines, "rung": rung_dict, "speed": speed}


def student_tags(teacher: Teacher, layers: list[int], decided: dict[str, Any], budget: float) -> dict[str, str]:
    """What the registry records of a distillation: the teacher's version (lineage), the cut and the verdict."""
    r = teacher.record
    return {
        "distill.teacher": f"{r.name}/{r.version}",
        "distill.teacher_version": r.version,
        "distill.teacher_run_id": r.run_id or "",
        "distill.layers": ",".join(map(str, layers)),
        "distill.speedup": f"{decided['speed']['speedup']:.3f}",
        "distill.min_speedup": f"{teacher.cfg.export.distill_min_speedup:g}",
        "distill.teacher_latency_ms": f"{decided['speed']['teacher_ms']:.3f}",
        "distill.student_latency_ms": f"{decided['speed']['student_ms']:.3f}",
        "distill.budget_pt": f"{budget:g}",
        "distill.ship": str(decided["ship"]).lower(),
        "distill.reason": decided["reason"][:5000],  # MLflow caps tag values; the summary keeps the whole text
    }


def decide_student(
    tracker: Tracker, teacher: Teacher, student_onnx: Path, baseline: dict[str, Any] | None, work: Path
) -> dict[str, Any]:
    """Both shipped ONNX files on the same test split and the same batch-1 input; the verdict and its lines."""
    feeds, y, one = test_feeds(teacher)
    teacher_onnx = shipped_onnx(tracker, teacher.record, work)
    speed = side_by_side(teacher_onnx, student_onnx, one)
    d, export = teacher.cfg.distill, teacher.cfg.export
    budget = export.int8_budget_pt if d.budget_pt is None else d.budget_pt
    class_budget = export.int8_class_budget_pt if d.class_budget_pt is None else d.class_budget_pt
    decided = verdict(
        y, onnx_predict(teacher_onnx, feeds), onnx_predict(student_onnx, feeds), teacher.classes, budget, class_budget,
        baseline, speed, export.distill_min_speedup,
    )  # fmt: skip
    return decided | {"budget_pt": budget, "class_budget_pt": class_budget, "teacher_onnx": teacher_onnx.name,
                      "student_onnx": student_onnx.name}  # fmt: skip
