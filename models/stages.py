"""The staged fine-tuning policy: which weights train in each stage, and at what learning rate.

- probe:   encoder frozen, head only (trained on cached features, see trainer.fit on HeadOnly)
- partial: the top-k transformer blocks + everything above them + head
- full:    every weight
- lora:    LoRA adapters on the encoder's attention projections (peft) + head; merged afterwards

Layer-wise LR decay follows timm's `param_groups_layer_decay`: block i of n gets
lr * decay ** (n + 1 - layer_id), so the head learns fastest and the embeddings slowest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
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
    plan = replace(plan, epochs=spec.epochs, warmup_ratio=spec.warmup_ratio, patience=spec.patience)
    result = fit(target, groups, train, val, plan, checkpoint, on_epoch, title or spec.kind, resume_dir)
    if spec.kind == "lora":
        merge_lora(model)
    for param in model.parameters():
        param.requires_grad = True
    return result
