"""Probe stage: head trained on cached features vs the frozen backbone run every epoch, side by side.

Same MiniLM, same real tweets, same head, same epochs. The cached probe pays one encoder pass up front;
the naive probe pays it every epoch. Prints per-epoch times and the ratio; writes JSON.

    python -m benchmarks.bench_probe [--quick]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import machine_info, write_result
from models.backbone import HeadOnly
from models.batching import feature_batches
from models.stages import frozen_features, set_trainable
from models.text import TextAdapter
from models.trainer import FitPlan, fit
from runconfig import DataConfig
from tasks.data import load_dataset
from tasks.finetune import Encoded


def run(n_train: int, epochs: int, data: Path, workdir: Path) -> dict[str, Any]:
    ds = load_dataset(DataConfig(modality="text", path=data, dvc_file=None, train_limit=n_train, validation_limit=500))
    adapter = TextAdapter(max_length=64)
    model = adapter.build("minilm", len(ds.classes))
    set_trainable(model, "probe")
    enc = Encoded(
        (adapter.encode(ds.train.items), ds.train.labels),
        (adapter.encode(ds.validation.items), ds.validation.labels),
        ([], []),
    )
    # cached: one encoder pass over train + validation, then epochs over features
    start = time.perf_counter()
    feats = {s: frozen_features(model, enc.batches(adapter, s, 128, sort=True), "cpu") for s in ("train", "validation")}
    for split in feats:  # back to split order, as the flow does
        order = torch.as_tensor(enc.batches(adapter, split, 128, sort=True).order)
        feats[split][order] = feats[split].clone()
    extract = time.perf_counter() - start
    start = time.perf_counter()
    fit(
        HeadOnly(model),
        [{"params": list(model.head.parameters()), "lr": 3e-3, "weight_decay": 0.0}],
        lambda e: feature_batches(feats["train"], ds.train.labels, 32, e),
        feature_batches(feats["validation"], ds.validation.labels, 128, None),
        FitPlan(epochs=epochs),
        workdir / "cached.safetensors",
        title="cached probe",
    )
    cached_epochs = (time.perf_counter() - start) / epochs
    # naive: the frozen encoder runs forward on every batch of every epoch
    start = time.perf_counter()
    fit(
        model,
        [{"params": list(model.head.parameters()), "lr": 3e-3, "weight_decay": 0.0}],
        lambda e: enc.batches(adapter, "train", 32, seed=e),
        enc.batches(adapter, "validation", 128, sort=True),
        FitPlan(epochs=epochs),
        workdir / "naive.safetensors",
        title="naive probe",
    )
    naive_epoch = (time.perf_counter() - start) / epochs
    return {
        "train_examples": len(ds.train),
        "epochs": epochs,
        "feature_extraction_s": extract,
        "cached_epoch_s": cached_epochs,
        "naive_epoch_s": naive_epoch,
        "speedup_per_epoch_after_first": naive_epoch / cached_epochs,
        "speedup_whole_stage": naive_epoch * epochs / (extract + cached_epochs * epochs),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--data", type=Path, default=Path("data/tweets"))
    args = parser.parse_args(argv)
    n, epochs = (500, 2) if args.quick else (2000, 4)
    workdir = Path("runs/bench")
    results = run(n, epochs, args.data, workdir) | {"machine": machine_info()}
    print(
        f"\nprobe on {results['train_examples']} tweets, {epochs} epochs: "
        f"feature pass {results['feature_extraction_s']:.1f}s, "
        f"cached epoch {results['cached_epoch_s']:.2f}s, naive epoch {results['naive_epoch_s']:.1f}s → "
        f"{results['speedup_per_epoch_after_first']:.0f}× per epoch, {results['speedup_whole_stage']:.1f}× whole stage"
    )
    print(f"wrote {write_result('probe', results)}")
    return results


if __name__ == "__main__":
    main()
