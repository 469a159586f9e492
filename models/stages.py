"""The staged fine-tuning policy: which weights train in each stage, and at what learning rate.

- probe:   encoder frozen, head only (trained on cached features, see trainer.fit on HeadOnly)
- partial: the top-k transformer blocks + everything above them + head
- full:    every weight
- lora:    LoRA adapters on the encoder's attention projections (peft) + head; merged afterwards

Layer-wise LR decay follows timm's `param_groups_layer_decay`: block i of n gets
lr * decay ** (n + 1 - layer_id), so the head learns fastest and the embeddings slowest.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.backbone import HeadOnly, TransferModel, layer_id, num_blocks
from models.batching import Batch
from models.trainer import FitPlan, FitResult, autocast, fit, progress, to_device

STAGE_KINDS = ("probe", "partial", "full", "lora")


def set_trainable(model: TransferModel, kind: str, top_k_blocks: int = 2) -> int:
    """Freeze / unfreeze for a stage; returns the number of trainable parameters."""
    if kind not in STAGE_KINDS:
        raise ValueError(f"unknown stage kind {kind!r}; expected one of {STAGE_KINDS}")
    n = num_blocks(model)
    for name, param in model.named_parameters():
        lid = layer_id(name, n)
        if kind == "full":
            param.requires_grad = True
        elif kind == "partial":
            param.requires_grad = lid > n - top_k_blocks
        elif kind == "lora":
            param.requires_grad = "lora_" in name or not name.startswith("encoder.")
        else:  # probe
            param.requires_grad = not name.startswith("encoder.")
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def param_groups(
    named_params: Iterable[tuple[str, nn.Parameter]], lr: float, weight_decay: float, layer_decay: float, n_blocks: int
) -> list[dict[str, Any]]:
    """Optimizer groups with layer-wise LR decay; no weight decay on biases and norms (1-D tensors)."""
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in named_params:
        if not param.requires_grad:
            continue
        lid = layer_id(name, n_blocks)
        decay = param.ndim > 1 and "lora_" not in name
        group = groups.setdefault(
            (lid, decay),
            {
                "params": [],
                "names": [],
                "lr": lr * layer_decay ** (n_blocks + 1 - lid),
                "weight_decay": weight_decay if decay else 0.0,
            },
        )
        group["params"].append(param)
        group["names"].append(name)
    return [groups[key] for key in sorted(groups)]


def add_lora(model: TransferModel, targets: list[str], r: int, alpha: int, dropout: float) -> TransferModel:
    """Wrap the encoder with peft LoRA adapters on `targets` (e.g. query/value projections)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    model.encoder = get_peft_model(model.encoder, config)
    return model


def merge_lora(model: TransferModel) -> TransferModel:
    """Fold LoRA weights into the encoder so export and serving see a plain model."""
    if hasattr(model.encoder, "merge_and_unload"):
        model.encoder = model.encoder.merge_and_unload()
    return model


@dataclass(frozen=True)
class StageSpec:
    """One stage's settings as plain values (built from the config by the task; models never see config)."""

    kind: str
    epochs: int = 1
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.0
    layer_decay: float = 1.0
    top_k_blocks: int = 2
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    patience: int | None = None
    steps: int | None = None  # a budget of optimizer steps instead of epochs (small data sets)
    eval_rounds: int = 10  # with `steps`: how many validations (and best-checkpoint chances) along the way
    schedule: str = "linear"
    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0


class Rounds(Sequence[Batch]):
    """The batches of several epochs laid end to end and cut at `length`: one evaluation round of a step budget."""

    def __init__(self, epochs: list[Sequence[Batch]], length: int):
        self.epochs, self.length = epochs, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Batch:  # type: ignore[override]
        if not 0 <= i < self.length:
            raise IndexError(i)
        for epoch in self.epochs:
            if i < len(epoch):
                return epoch[i]
            i -= len(epoch)
        raise IndexError(i)

    def __iter__(self) -> Iterator[Batch]:
        for i in range(self.length):
            yield self[i]


def step_budget(
    train: Callable[[int], Sequence[Batch]], steps: int, rounds: int, grad_accum: int = 1
) -> tuple[Callable[[int], Sequence[Batch]], int]:
    """(batches of round r, number of rounds) for a budget of `steps` optimizer steps: a tiny data set gets
    many shuffled passes per round instead of hundreds of one-pass epochs each followed by a validation."""
    per_epoch = len(train(0))
    rounds = max(1, min(rounds, steps))
    per_round = math.ceil(steps / rounds) * grad_accum
    passes = math.ceil(per_round / per_epoch)
    return (lambda r: Rounds([train(r * passes + k) for k in range(passes)], per_round)), rounds


def frozen_features(
    model: TransferModel, batches: Sequence[Batch], device: str, bf16: bool = False, title: str = "features"
) -> torch.Tensor:
    """Pooled encoder outputs for every example, computed once (the probe's cache, and the probe baseline)."""
    model.eval()
    out = []
    with torch.no_grad():
        for inputs, _ in progress(batches, title):
            with autocast(device, bf16):
                out.append(model.features(**to_device(inputs, device)).float().cpu())
    return torch.cat(out)


def train_stage(
    model: TransferModel,
    spec: StageSpec,
    train: Callable[[int], Sequence[Batch]],
    val: Sequence[Batch],
    plan: FitPlan,
    checkpoint: Path,
    lora_targets: list[str],
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    title: str = "",
    resume_dir: Path | None = None,
) -> FitResult:
    """Run one stage on `model` in place; for `probe`, `train`/`val` hold cached features, not raw inputs."""
    if spec.kind == "lora":
        add_lora(model, lora_targets, spec.lora_r, spec.lora_alpha, spec.lora_dropout)
    set_trainable(model, spec.kind, spec.top_k_blocks)
    target: nn.Module = HeadOnly(model) if spec.kind == "probe" else model
    groups = param_groups(target.named_parameters(), spec.lr, spec.weight_decay, spec.layer_decay, num_blocks(model))
    epochs = spec.epochs
    if spec.steps:
        train, epochs = step_budget(train, spec.steps, spec.eval_rounds, plan.grad_accum_steps)
    plan = replace(
        plan,
        epochs=epochs,
        warmup_ratio=spec.warmup_ratio,
        patience=spec.patience,
        schedule=spec.schedule,
        label_smoothing=spec.label_smoothing,
        mixup_alpha=0.0 if spec.kind == "probe" else spec.mixup_alpha,  # cached features are not images
        cutmix_alpha=0.0 if spec.kind == "probe" else spec.cutmix_alpha,
        num_classes=model.head.out_features,
    )
    result = fit(target, groups, train, val, plan, checkpoint, on_epoch, title or spec.kind, resume_dir)
    if spec.kind == "lora":
        merge_lora(model)
    for param in model.parameters():
        param.requires_grad = True
    return result
