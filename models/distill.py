"""Knowledge distillation, pure torch: a shallower student cut from the teacher, the KD loss, and its loop.

The student is the teacher with every other encoder block dropped (DistilBERT's recipe): same embeddings, same
width, same pooling and head, and the kept blocks copied weight for weight, so it starts close to the teacher
instead of from noise. It then learns from the teacher's logits, computed once over the training split and handed
in as a tensor, so the loop never runs the teacher. Works for any encoder with a Hugging Face list of blocks
(BERT-style text encoders, the ViTs of `models/small_vit.py`).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from models.backbone import TransferModel
from models.batching import Batch
from models.trainer import predict, scores, to_device

BLOCK_LISTS = ("encoder.layer", "layers", "encoder.layers", "layer")  # BERT; ViT (transformers 5); others


def _block_owner(model: TransferModel) -> tuple[nn.Module, str]:
    """The module holding the encoder's list of Transformer blocks, and that list's attribute name."""
    for path in BLOCK_LISTS:
        *parents, name = path.split(".")
        owner = model.encoder
        for part in parents:
            owner = getattr(owner, part, None)
        if isinstance(getattr(owner, name, None), nn.ModuleList):
            return owner, name
    raise ValueError(f"{type(model.encoder).__name__}: no list of Transformer blocks ({', '.join(BLOCK_LISTS)})")


def blocks_of(model: TransferModel) -> nn.ModuleList:
    owner, name = _block_owner(model)
    return getattr(owner, name)


def kept_layers(n_blocks: int, keep: int) -> list[int]:
    """Which teacher blocks the student keeps: evenly spaced, always ending with the last one (the head was trained
    on its output): 6 → [1, 3, 5], 4 → [1, 3], 2 → [1]."""
    if not 1 <= keep <= n_blocks:
        raise ValueError(f"cannot keep {keep} of {n_blocks} blocks")
    return [round((i + 1) * n_blocks / keep) - 1 for i in range(keep)]


def make_student(teacher: TransferModel, keep: int | None = None) -> tuple[TransferModel, list[int]]:
    """A deep copy of the teacher with only `keep` of its blocks (default: half, rounded up); returns the student and
    the teacher indices of its blocks. The teacher is left untouched."""
    n = len(blocks_of(teacher))
    layers = kept_layers(n, keep or math.ceil(n / 2))
    student = copy.deepcopy(teacher)
    owner, name = _block_owner(student)
    setattr(owner, name, nn.ModuleList(getattr(owner, name)[i] for i in layers))  # the deep copy's own blocks
    student.encoder.config.num_hidden_layers = len(layers)  # what save_pretrained writes and from_pretrained rebuilds
    return student, layers


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float, alpha: float
) -> torch.Tensor:
    """alpha · T² · KL(teacher_T ‖ student_T) + (1 − alpha) · CE(student, labels) (Hinton et al. 2015).

    Softening by T shows the student which wrong classes the teacher found plausible; T² keeps that term's gradient
    on the scale of the cross-entropy's as T grows."""
    t = temperature
    soft = F.kl_div(
        F.log_softmax(student_logits / t, dim=-1), F.log_softmax(teacher_logits / t, dim=-1), reduction="batchmean",
        log_target=True,
    )  # fmt: skip
    return alpha * t * t * soft + (1 - alpha) * F.cross_entropy(student_logits, labels)


@dataclass
class DistillResult:
    history: list[dict[str, float]] = field(default_factory=list)
    best_metric: float = -math.inf
    best_step: int = 0
    seconds: float = 0.0


def distill(
    student: TransferModel,
    train: Callable[[int], Sequence[Batch]],
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    val: Sequence[Batch],
    *,
    steps: int,
    lr: float,
    temperature: float,
    alpha: float,
    eval_rounds: int = 4,
    weight_decay: float = 0.01,
    device: str = "cpu",
    metric: str = "macro_f1",
    log: Callable[[dict[str, float]], None] | None = None,
) -> DistillResult:
    """Train `student` in place for `steps` AdamW steps (linear warm-up over the first 10 %, then linear decay);
    validate `eval_rounds` times and keep the best weights by `metric`.

    `train(epoch)` yields batches whose "labels" are example indices: they pick each example's cached teacher
    logits and its true label, so any batch order (shuffled per epoch) lines up with the cache."""
    student.to(device)
    teacher_logits, labels = teacher_logits.to(device), labels.to(device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup)))
    )
    every = max(1, steps // max(1, eval_rounds))
    result, best_state, started = DistillResult(), None, time.perf_counter()
    step, epoch, running = 0, 0, 0.0
    while step < steps:
        for inputs, index in train(epoch):
            student.train()
            index = index.to(device)
            loss = kd_loss(student(**to_device(inputs, device)), teacher_logits[index], labels[index], temperature,
                           alpha)  # fmt: skip
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            step, running = step + 1, running + loss.item()
            if step % every == 0 or step == steps:
                logits, y, val_loss = predict(student, val, device, title="validate student")
                row = {"step": step, "train_kd_loss": running / every, "val_loss": val_loss, **scores(y, logits)}
                result.history.append(row)
                running = 0.0
                if log:
                    log(row)
                if row[metric] > result.best_metric:  # ties keep the earlier, less trained weights: no reason to move
                    result.best_metric, result.best_step = row[metric], step
                    best_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
            if step >= steps:
                break
        epoch += 1
    if best_state is not None:
        student.load_state_dict(best_state)
    result.seconds = round(time.perf_counter() - started, 1)
    student.eval()
    return result
