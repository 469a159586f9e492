"""Batches built lazily from pre-encoded examples: shuffled per epoch with a seed, collated on access."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

Batch = tuple[dict[str, torch.Tensor], torch.Tensor]


class Batches(Sequence[Batch]):
    """A re-iterable list of batches; memory stays one batch (images are decoded per batch, not all at once)."""

    def __init__(
        self,
        examples: Sequence[Any],
        labels: Sequence[int],
        batch_size: int,
        collate: Callable[[list[Any]], dict[str, torch.Tensor]],
        order: Sequence[int] | None = None,
    ):
        self.examples, self.labels, self.batch_size, self.collate = examples, labels, batch_size, collate
        self.order = list(order) if order is not None else list(range(len(labels)))

    def __len__(self) -> int:
        return (len(self.order) + self.batch_size - 1) // self.batch_size

    def __getitem__(self, i: int) -> Batch:  # type: ignore[override]
        if not 0 <= i < len(self):
            raise IndexError(i)
        idx = self.order[i * self.batch_size : (i + 1) * self.batch_size]
        # a tensor cache (models/image_cache.py) gathers a batch at once; a plain tensor (probe features) has an
        # unrelated flat-index `take`, so it keeps the row-by-row path
        take = None if isinstance(self.examples, torch.Tensor) else getattr(self.examples, "take", None)
        inputs = self.collate(take(idx) if take else [self.examples[j] for j in idx])
        return inputs, torch.as_tensor([self.labels[j] for j in idx], dtype=torch.long)

    def __iter__(self) -> Iterator[Batch]:
        for i in range(len(self)):
            yield self[i]


def by_length(examples: Sequence[Any], length: Callable[[Any], int]) -> list[int]:
    """Indices sorted by example length: inference batches of similar lengths pad far less."""
    return sorted(range(len(examples)), key=lambda i: length(examples[i]))


def shuffled(n: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=generator).tolist()


def feature_batches(
    features: torch.Tensor, labels: Sequence[int], batch_size: int, seed: int | None, order: Sequence[int] | None = None
) -> Batches:
    """Batches over cached features (the probe stage): no encoder, no collation cost."""
    order = shuffled(len(labels), seed) if seed is not None else order
    return Batches(features, labels, batch_size, lambda rows: {"features": torch.stack(rows)}, order)
