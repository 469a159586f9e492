"""Training-time augmentation of whole batches, as tensors (no PIL, no per-image Python loop).

torchvision.transforms.v2 applied to a batched tensor draws one set of random parameters for the whole batch.
So the geometry (a random scaled crop with translation and an optional flip, what RandomResizedCrop does) is
drawn per image and applied with one `affine_grid` + `grid_sample` call; the v2 policies (TrivialAugmentWide,
RandAugment, RandomErasing) run on a few groups of the batch, each group with its own draw: per-group
randomness at a fraction of the per-image cost. MixUp / CutMix (v2, they change the labels) live in the loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

POLICIES = ("none", "light", "trivial", "randaugment")


@dataclass(frozen=True)
class AugmentSpec:
    """`policy`: none (resize only), light (per-image crop/shift/flip), trivial / randaugment (light plus
    v2's TrivialAugmentWide / RandAugment per group). `erasing`: v2 RandomErasing probability per group."""

    policy: str = "light"
    hflip: bool = True
    scale: tuple[float, float] = (0.8, 1.0)  # share of the side kept by the random crop
    translate: float = 0.1  # share of the side the crop centre may move (zero padding beyond the border)
    rotate: float = 0.0  # degrees, uniform in ±rotate
    erasing: float = 0.0
    groups: int = 8

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown augmentation policy {self.policy!r}; choose from {POLICIES}")


def random_affine(x: torch.Tensor, spec: AugmentSpec, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image random crop-and-resize (scale), shift, flip and rotation of a float batch (B, C, H, W)."""
    b = x.shape[0]
    u = torch.rand(b, 5, generator=generator)
    lo, hi = spec.scale
    s = lo + (hi - lo) * u[:, 0]  # the sampled window's side, as a share of the image
    angle = math.radians(spec.rotate) * (2 * u[:, 1] - 1)
    tx, ty = (2 * u[:, 2] - 1) * 2 * spec.translate, (2 * u[:, 3] - 1) * 2 * spec.translate
    flip = torch.where((u[:, 4] < 0.5) & spec.hflip, -1.0, 1.0)
    cos, sin = torch.cos(angle) * s, torch.sin(angle) * s
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1
    )  # (B, 2, 3): output grid → input coordinates
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class BatchAugment:
    """uint8 (B, 3, S, S) → augmented float (B, 3, S, S) in [0, 1]."""

    def __init__(self, spec: AugmentSpec):
        from torchvision.transforms import v2

        self.spec = spec
        self.policy = {
            "trivial": v2.TrivialAugmentWide(),
            "randaugment": v2.RandAugment(num_ops=2, magnitude=9),
        }.get(spec.policy)
        self.erase = v2.RandomErasing(p=spec.erasing, scale=(0.02, 0.2), value=0) if spec.erasing > 0 else None

    def _per_group(self, x: torch.Tensor, op: torch.nn.Module) -> torch.Tensor:
        n = max(1, min(self.spec.groups, x.shape[0]))
        return torch.cat([op(chunk) for chunk in x.tensor_split(n)])

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if self.spec.policy == "none":
            return batch.float().div_(255)
        if self.policy is not None:
            batch = self._per_group(batch, self.policy)
        x = random_affine(batch.float().div_(255), self.spec)
        if self.erase is not None:
            x = self._per_group(x, self.erase)
        return x
