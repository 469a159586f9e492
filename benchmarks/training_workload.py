"""The training benchmark's workload and clock: the same pre-tokenised tweets in the same batch order for every loop,
the AdamW groups and padding policies they share, and the timers that mark the end of each optimizer step."""

from __future__ import annotations

import copy
import itertools
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models.batching import Batches, shuffled
from models.text import TextAdapter
from runconfig import DataConfig
from tasks.data import load_dataset

MAX_LENGTH = 64
LR, WEIGHT_DECAY = 5e-5, 0.01


# --- the workload --------------------------------------------------------------------------------------------


@dataclass
class Workload:
    """Pre-tokenised examples already in batch order (a seeded shuffle), and the prototype model."""

    adapter: Any
    proto: torch.nn.Module
    ids: list[list[int]]
    labels: list[int]
    batch_size: int
    warmup: int
    steps: int

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps

    def fresh_model(self) -> torch.nn.Module:
        model = copy.deepcopy(self.proto)
        model.train()
        return model

    def batches(self, collate: Callable[[list[list[int]]], dict[str, torch.Tensor]] | None = None) -> Batches:
        return Batches(self.ids, self.labels, self.batch_size, collate or self.adapter.collate)


def load_workload(data: Path, batch_size: int, warmup: int, steps: int, seed: int = 0) -> Workload:
    need = (warmup + steps) * batch_size
    ds = load_dataset(DataConfig(modality="text", path=data, dvc_file=None, train_limit=need + 16), seed=seed)
    order = shuffled(len(ds.train), seed)[:need]  # the split file is grouped by label: shuffle before batching
    if len(order) < need:
        raise SystemExit(f"{data}: need {need} training examples, found {len(order)}")
    adapter = TextAdapter(max_length=MAX_LENGTH)
    torch.manual_seed(seed)
    proto = adapter.build("minilm", len(ds.classes))
    ids = adapter.encode([ds.train.items[i] for i in order])
    return Workload(adapter, proto, ids, [ds.train.labels[i] for i in order], batch_size, warmup, steps)


def adamw_groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    """Two groups, as Trainer builds them: weight decay on matrices, none on biases and norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim > 1], "lr": LR, "weight_decay": WEIGHT_DECAY},
        {"params": [p for p in params if p.ndim <= 1], "lr": LR, "weight_decay": 0.0},
    ]


def fixed_collate(pad_id: int, length: int) -> Callable[..., dict[str, torch.Tensor]]:
    """Pad every batch to `length` (what `padding="max_length"` does), for the dynamic-padding comparison."""

    def collate(rows: list[list[int]], train: bool = False) -> dict[str, torch.Tensor]:
        input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for r, ids in enumerate(rows):
            input_ids[r, : len(ids)] = torch.as_tensor(ids[:length])
            attention_mask[r, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    return collate


def padding_stats(ids: list[list[int]], batch_size: int, max_length: int, mega: int = 50) -> dict[str, float]:
    """Tokens per example each padding policy computes on, and how many of them are real. `grouped` is what
    length-grouped batching would give (sort each window of `mega` × batch_size shuffled examples by length, as
    Hugging Face's LengthGroupedSampler does): an estimate from the lengths, not a timing."""
    lengths = [len(x) for x in ids]

    def padded(order: list[int]) -> float:
        chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        return sum(len(c) * max(lengths[j] for j in c) for c in chunks) / len(order)

    window = mega * batch_size
    grouped = [
        j
        for w in range(0, len(lengths), window)
        for j in sorted(range(w, min(w + window, len(lengths))), key=lambda j: -lengths[j])
    ]
    mean = sum(lengths) / len(lengths)
    dynamic = padded(list(range(len(lengths))))
    by_length = padded(grouped)
    return {
        "mean_tokens": mean,
        "dynamic_padded_tokens": dynamic,
        "grouped_padded_tokens": by_length,
        "fixed_padded_tokens": float(max_length),
        "dynamic_real_fraction": mean / dynamic,
        "grouped_real_fraction": mean / by_length,
        "fixed_real_fraction": mean / max_length,
    }


# --- timing --------------------------------------------------------------------------------------------------


@dataclass
class Clock:
    """marks[k] = perf_counter at the end of optimizer step k (marks[0]: before the first batch is fetched)."""

    warmup: int
    batch_size: int
    marks: list[float] = field(default_factory=list)
    threads_seen: int | None = None

    def mark(self) -> None:
        self.marks.append(time.perf_counter())
        if len(self.marks) == self.warmup + 1:
            self.threads_seen = torch.get_num_threads()

    def result(self) -> dict[str, Any]:
        if len(self.marks) < self.warmup + 2:
            raise RuntimeError(f"loop recorded {len(self.marks) - 1} steps, needs more than {self.warmup}")
        timed = self.marks[self.warmup :]
        seconds = timed[-1] - timed[0]
        steps = len(timed) - 1
        step_s = [b - a for a, b in itertools.pairwise(timed)]
        return {
            "timed_steps": steps,
            "samples": steps * self.batch_size,
            "seconds": seconds,
            "samples_per_s": steps * self.batch_size / seconds,
            "median_step_s": statistics.median(step_s),
            "step_s": step_s,
            "threads": self.threads_seen,
        }


class TimedBatches(Sequence):
    """The training batches `fit` sees: requesting batch i marks the end of step i (i steps done)."""

    def __init__(self, inner: Batches, clock: Clock, collate_times: list[float] | None = None):
        self.inner, self.clock, self.collate_times = inner, clock, collate_times

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int) -> Any:  # type: ignore[override]
        if i == len(self.clock.marks):  # the first request of batch i (fit may index or iterate)
            self.clock.mark()
        start = time.perf_counter()
        batch = self.inner[i]
        if self.collate_times is not None:
            self.collate_times.append(time.perf_counter() - start)
        return batch

    def __iter__(self) -> Iterator[Any]:
        for i in range(len(self)):
            yield self[i]


class EndMarker(Sequence):
    """The validation batches `fit` evaluates after the epoch: their first use marks the end of the last step."""

    def __init__(self, inner: Sequence, clock: Clock, n_steps: int):
        self.inner, self.clock, self.n_steps = inner, clock, n_steps

    def _end(self) -> None:
        if len(self.clock.marks) == self.n_steps:  # every training batch was requested: training is over
            self.clock.mark()

    def __len__(self) -> int:
        self._end()
        return len(self.inner)

    def __getitem__(self, i: int) -> Any:  # type: ignore[override]
        self._end()
        return self.inner[i]

    def __iter__(self) -> Iterator[Any]:
        self._end()
        return iter(self.inner)
