"""Evaluation on the held-out test split: metrics, per-class report, confusion matrix and curves as
PNGs, and the two reference baselines every fine-tuned model must beat."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from prefect import task
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import classification_report, confusion_matrix

from models.adapters import load_model_dir
from models.batching import Batch
from models.trainer import predict, scores
from runconfig import RunConfig
from tasks.data import DataError, load_dataset
from tasks.finetune import Encoded
from tasks.prefect_options import LIVE
from tasks.registered_version import RegistryError
from tasks.tracking import Tracker, VersionRecord


def report(y_true: Sequence[int], logits: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """accuracy, macro-F1 and scikit-learn's per-class precision / recall / F1 / support."""
    y_pred = logits.argmax(-1)
    per_class = classification_report(
        y_true, y_pred, labels=list(range(len(classes))), target_names=classes, output_dict=True, zero_division=0
    )
    return {**scores(np.asarray(y_true), logits), "per_class": {c: per_class[c] for c in classes}}


@task(**LIVE)
def evaluate_model(
    model: torch.nn.Module, batches: Sequence[Batch], classes: list[str], device: str, out_dir: Path, bf16: bool = False
) -> dict[str, Any]:
    """Test metrics and a confusion-matrix PNG for the final model."""
    logits, labels, loss = predict(model, batches, device, bf16)
    result = report(labels, logits, classes) | {"loss": loss}
    result["confusion_png"] = str(plot_confusion(labels, logits.argmax(-1), classes, out_dir / "confusion_matrix.png"))
    return result | {"logits": logits}


def plot_confusion(y_true: Sequence[int], y_pred: Sequence[int], classes: list[str], path: Path) -> Path:
    matrix = confusion_matrix(y_true, y_pred, labels=list(range(len(classes))))
    size = max(4.0, 0.6 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xlabel="predicted", ylabel="true")
    ax.set_xticklabels(classes, rotation=45, ha="right")
    ax.set_yticklabels(classes)
    for (i, j), n in np.ndenumerate(matrix):
        ax.text(j, i, str(n), ha="center", va="center", color="white" if n > matrix.max() / 2 else "black")
    ax.set_title("test confusion matrix")
    return _save(fig, path)


def plot_curves(histories: dict[str, list[dict[str, float]]], metric: str, path: Path) -> Path:
    """Validation metric and train loss per epoch, stages laid end to end."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    offset = 0
    for stage, rows in histories.items():
        x = [offset + r["epoch"] for r in rows]
        left.plot(x, [r[f"val_{metric}"] for r in rows], marker="o", label=stage)
        right.plot(x, [r["train_loss"] for r in rows], marker="o", label=stage)
        offset = x[-1] if x else offset
    left.set(title=f"validation {metric}", xlabel="epoch (cumulative)")
    right.set(title="train loss", xlabel="epoch (cumulative)")
    left.legend()
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@task(**LIVE)
def baselines(
    adapter: Any,
    train_items: list[Any],
    train_labels: list[int],
    test_items: list[Any],
    test_labels: list[int],
    features: dict[str, torch.Tensor] | None,
    n_classes: int,
) -> dict[str, dict[str, float]]:
    """The classical baseline of the modality (TF-IDF + LR for text) and a linear probe on frozen features."""
    eye = np.eye(n_classes)
    out = {"classical": scores(test_labels, eye[adapter.classical_baseline(train_items, train_labels, test_items)])}
    if features is not None:
        probe = LogisticRegression(max_iter=3000, C=1.0).fit(features["train"].numpy(), train_labels)
        out["frozen_probe"] = scores(test_labels, eye[probe.predict(features["test"].numpy())])
    return out


def baseline_verdict(
    model_test: dict[str, float], refs: dict[str, dict[str, float]], metric: str
) -> dict[str, Any] | None:
    """Does the model beat every baseline of its own run on the test split? None when none was evaluated.

    Losing to a baseline means a strictly lower test `metric`: a tie with a linear model is no reason to ship a
    Transformer either, but it is not flagged as a loss."""
    if not refs:
        return None
    mine = float(model_test[metric])
    theirs = {name: float(m[metric]) for name, m in refs.items()}
    lost_to = sorted(name for name, score in theirs.items() if mine < score)
    best_name = max(theirs, key=lambda name: theirs[name])
    if lost_to:
        detail = f"test {metric} {mine:.4f} is below baseline " + ", ".join(
            f"{name} {theirs[name]:.4f}" for name in lost_to
        )
    else:
        detail = f"test {metric} {mine:.4f} ≥ every baseline (best: {best_name} {theirs[best_name]:.4f})"
    return {"passed": not lost_to, "metric": metric, "model": mine, "baselines": theirs, "lost_to": lost_to,
            "detail": detail}  # fmt: skip


def plot_transfer(rows: list[dict[str, Any]], path: Path) -> Path:
    """Grouped bars: test accuracy per target, one bar per init × schedule."""
    targets = sorted({r["target"] for r in rows})
    arms = sorted({(r["init"], r["schedule"]) for r in rows})
    fig, ax = plt.subplots(figsize=(max(6.0, 2.2 * len(targets)), 4))
    width = 0.8 / len(arms)
    for k, arm in enumerate(arms):
        values = [
            next((r["test_accuracy"] for r in rows if (r["target"], r["init"], r["schedule"]) == (t, *arm)), 0.0)
            for t in targets
        ]
        ax.bar([i + k * width for i in range(len(targets))], values, width, label=f"{arm[0]} · {arm[1]}")
    for i, target in enumerate(targets):  # the bar to beat: the runs' own LR on pixels, across the whole group
        pixel_lr = [r["pixel_lr_accuracy"] for r in rows if r["target"] == target and r.get("pixel_lr_accuracy")]
        if pixel_lr:
            ax.hlines(max(pixel_lr), i - width / 2, i + 0.8 - width / 2, colors="black", linestyles="dashed",
                      label="LR on pixels" if i == 0 else None)  # fmt: skip
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(targets))], targets)
    low = min([r["test_accuracy"] for r in rows] + [r.get("pixel_lr_accuracy") or 1 for r in rows])
    ax.set(ylabel="test accuracy", ylim=(max(0.0, low - 0.1), 1), title="transfer vs from scratch vs LR on pixels")
    ax.legend(fontsize=8, loc="upper right")
    return _save(fig, path)


# --- a registered version, re-evaluated on its run's test split (the promotion gate) ---------------------------


@dataclass
class TestSplit:
    """The challenger's test split, shared by both evaluations."""

    items: list[Any]
    labels: list[int]
    classes: list[str]
    batch_size: int
    device: str


def load_test_split(cfg: RunConfig, device: str) -> TestSplit:
    try:
        dataset = load_dataset(cfg.data, seed=cfg.training.seed)
    except (DataError, ValueError) as exc:
        raise RegistryError(f"cannot load the challenger's test split: {exc}") from None
    test = dataset.test
    return TestSplit(test.items, test.labels, dataset.classes, cfg.training.eval_batch_size, device)


def evaluate_version(tracker: Tracker, record: VersionRecord, split: TestSplit, work: Path) -> dict[str, float]:
    source = tracker.training_model_uri(f"models:/{record.name}/{record.version}")  # the run's model/, not the pyfunc
    model_dir = tracker.download(source, work / f"model-v{record.version}")
    return evaluate_model_dir(model_dir, split)


def evaluate_model_dir(model_dir: Path, split: TestSplit) -> dict[str, float]:
    """Accuracy, macro-F1 and loss of a saved model on the split, its logits reordered to the split's classes.

    No progress bar: the gate runs inside other flows and in parallel threads (one Rich live display each)."""
    adapter, model, meta = load_model_dir(model_dir)
    if sorted(meta["classes"]) != sorted(split.classes):
        raise RegistryError(f"{model_dir}: model classes {meta['classes']} differ from the data's {split.classes}")
    order = torch.as_tensor([meta["classes"].index(c) for c in split.classes])
    encoded = Encoded(([], []), ([], []), (adapter.encode(split.items), split.labels))
    model.to(split.device).eval()
    logits, labels = [], []
    with torch.inference_mode():
        for inputs, y in encoded.batches(adapter, "test", split.batch_size, sort=True):
            out = model(**{k: v.to(split.device) for k, v in inputs.items()}).float().cpu()
            logits.append(out[:, order])
            labels.append(y)
    all_logits, all_labels = torch.cat(logits), torch.cat(labels)
    loss = F.cross_entropy(all_logits, all_labels).item()
    return {k: round(v, 6) for k, v in scores(all_labels.numpy(), np.asarray(all_logits)).items()} | {
        "loss": round(loss, 6)
    }
