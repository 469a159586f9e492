"""Self-supervised objectives: masked image modelling (SimMIM-style, ViT) and masked language modelling.

Both train a Hugging Face model whose forward returns `.loss`, then hand back the bare encoder so the
fine-tuning code can use it as any other backbone. No labels are read here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from models.trainer import fusable, progress, to_device


@dataclass
class PretrainResult:
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def mim_model(encoder: nn.Module) -> nn.Module:
    """ViTForMaskedImageModeling around `encoder`'s weights: a mask token and a light pixel decoder."""
    from transformers import ViTForMaskedImageModeling

    from models.small_vit import install_conv_stem

    config = encoder.config
    config.encoder_stride = config.patch_size
    mim = ViTForMaskedImageModeling(config)
    if getattr(config, "conv_stem", False):
        install_conv_stem(mim.vit)
    missing, unexpected = mim.vit.load_state_dict(encoder.state_dict(), strict=False)
    if unexpected or [k for k in missing if "mask_token" not in k]:
        raise ValueError(f"encoder does not fit its MIM model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return mim


def random_patch_mask(batch: int, patches: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """Boolean (batch, patches) mask with exactly round(ratio · patches) patches hidden per image."""
    hidden = max(1, round(ratio * patches))
    scores = torch.rand(batch, patches, generator=generator)
    return scores.argsort(dim=1).argsort(dim=1) < hidden


def mlm_model(encoder: nn.Module) -> nn.Module:
    """A masked-LM model around `encoder`'s weights: built from its config (a fresh MLM head, tied to the
    embeddings), then the encoder weights copied in. Avoids loading an encoder-only checkpoint into an
    MLM architecture, which can leave the missing head on the meta device."""
    from transformers import AutoModelForMaskedLM

    mlm = AutoModelForMaskedLM.from_config(encoder.config)
    missing, unexpected = mlm.base_model.load_state_dict(encoder.state_dict(), strict=False)
    if [k for k in [*missing, *unexpected] if "pooler" not in k]:  # MLM models have no pooler
        raise ValueError(f"encoder does not fit its MLM model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    mlm.tie_weights()
    return mlm


def mlm_collate(tokenizer: Any, probability: float) -> Callable[[list[list[int]]], dict[str, torch.Tensor]]:
    """BERT's recipe: 15% of tokens chosen; of those 80% [MASK], 10% random, 10% kept (transformers' collator)."""
    from transformers import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=probability)
    return lambda rows: dict(collator([{"input_ids": ids} for ids in rows]))


def pretrain(
    model: nn.Module,
    batches: Callable[[int], Sequence[dict[str, torch.Tensor]]],
    epochs: int,
    lr: float,
    weight_decay: float,
    warmup_ratio: float,
    device: str,
    title: str,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> PretrainResult:
    """The plainest loop: the model computes its own loss; AdamW, linear warmup/decay, clipping at 1.0."""
    from transformers import get_linear_schedule_with_warmup

    model.to(device).train()
    total = epochs * len(batches(0))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fusable(params))
    scheduler = get_linear_schedule_with_warmup(optimizer, int(warmup_ratio * total), total)
    result, started = PretrainResult(), time.perf_counter()
    for epoch in range(epochs):
        epoch_start, losses = time.perf_counter(), []
        for inputs in progress(batches(epoch), f"{title} epoch {epoch + 1}/{epochs}"):
            loss = model(**to_device(inputs, device)).loss
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        row = {"epoch": epoch + 1, "loss": sum(losses) / len(losses), "seconds": time.perf_counter() - epoch_start}
        if not math.isfinite(row["loss"]):
            raise FloatingPointError(f"{title}: loss became {row['loss']} in epoch {epoch + 1}; lower the lr")
        result.history.append(row)
        if on_epoch:
            on_epoch(row)
    result.seconds = time.perf_counter() - started
    return result
