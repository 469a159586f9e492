"""The vision loop side by side: images/s of `models.trainer.fit` on a small ViT against a minimal hand-written
loop over pre-decoded tensors, and against the loop before the tensor cache (PIL decode + per-image v2 transforms
on every batch, what `VisionAdapter.pixels` did until issue 16).

Same model (`VisionAdapter(image_size=28).build("scratch:<arch>", 10)`, identical initial weights), same real
Fashion-MNIST training images (`data/fashion-mnist/train-images.npy`), batch 64, fp32, AdamW, the same number of
optimizer steps and torch threads. Loops:

- `plain`:   normalised float tensors prepared before timing; forward, cross-entropy, backward, fused AdamW step.
- `fit`:     `fit` over `Batches` of the uint8 `ImageCache` (`augment=none`): the loop with its collation,
             clipping, scheduler, progress bar and loss sync. The goal: ≥ 0.9× `plain`.
- `fit_light` / `fit_trivial`: the same with batch augmentation (`light`, `trivial` + MixUp/CutMix).
- `before`:  `fit` fed the old way: every batch decoded through PIL and transformed image by image.

The clock is an optimizer step pre-hook: the first `warmup` steps run untimed; per loop the figure adds up each
step's fastest time over the rounds (the same batch every round; contention on a shared machine only slows steps
down), loops rotated each round.

    python -m benchmarks.bench_vision_loop [--quick] [--arch vit-tiny-c7]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_pre_hook

from benchmarks.common import ROOT, machine_info, write_result
from models.batching import Batches
from models.trainer import FitPlan, fit
from models.vision import VisionAdapter, load_image

BATCH = 64
GOAL = 0.9  # fit vs plain
LOOPS = ("plain", "fit", "fit_light", "fit_trivial", "before")


class StepClock:
    """Timestamps of every optimizer step (a global pre-hook), so each loop is timed the same way."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __enter__(self) -> StepClock:
        self.handle = register_optimizer_step_pre_hook(lambda *_: self.times.append(time.perf_counter()))
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()

    def step_seconds(self, warmup: int) -> list[float]:
        return list(np.diff(self.times[warmup:]))


def old_pixels(adapter: VisionAdapter, item: Any, train: bool) -> torch.Tensor:
    """What the adapter did per image before the cache: PIL decode, v2 transforms, normalise (the 'before')."""
    from PIL import Image
    from torchvision.transforms import v2

    img = load_image(item)
    if train:
        ops = [v2.RandomResizedCrop(adapter.image_size, scale=(0.7, 1.0), antialias=True), v2.RandomHorizontalFlip()]
        img = v2.Compose([*ops, v2.ColorJitter(brightness=0.2, contrast=0.2)])(img)
    else:
        img = img.resize((adapter.image_size, adapter.image_size), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - 0.5) / 0.5


def build(arch: str, state: dict[str, torch.Tensor] | None, augment: str = "none") -> tuple[VisionAdapter, Any]:
    adapter = VisionAdapter(image_size=28, hflip=True, augment=augment)
    torch.manual_seed(0)
    model = adapter.build(f"scratch:{arch}", 10)
    if state is not None:
        model.load_state_dict(state)
    return adapter, model


def run_fit(arch: str, state: dict, items: list[np.ndarray], labels: list[int], steps: int, loop: str) -> list[float]:
    augment = {"fit": "none", "fit_light": "light", "fit_trivial": "trivial", "before": "none"}[loop]
    adapter, model = build(arch, state, augment)
    n = steps * BATCH
    if loop == "before":
        collate: Callable = lambda rows: {"pixel_values": torch.stack([old_pixels(adapter, r, True) for r in rows])}  # noqa: E731
        examples: Sequence = items[:n]
    else:
        collate = lambda rows: adapter.collate(rows, True)  # noqa: E731
        examples = adapter.encode(items[:n])  # the cache, built once per split (not timed: done once per run)
    train = Batches(examples, labels[:n], BATCH, collate)
    val = Batches(examples, labels[:BATCH], BATCH, collate)
    groups = [{"params": [p for p in model.parameters()], "lr": 1e-3, "weight_decay": 0.05}]
    mix = loop == "fit_trivial"
    plan = FitPlan(epochs=1, metric="accuracy", mixup_alpha=0.8 * mix, cutmix_alpha=1.0 * mix, num_classes=10)
    with tempfile.TemporaryDirectory() as tmp, StepClock() as clock:
        fit(model, groups, lambda _: train, val, plan, Path(tmp) / "best.safetensors", title=loop)
    return clock.times


def run_plain(arch: str, state: dict, items: list[np.ndarray], labels: list[int], steps: int) -> list[float]:
    adapter, model = build(arch, state)
    x = adapter.collate(adapter.encode(items[: steps * BATCH]))["pixel_values"]  # pre-decoded, normalised
    y = torch.as_tensor(labels[: steps * BATCH])
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05, fused=True)
    model.train()
    with StepClock() as clock:
        for i in range(steps):
            loss = F.cross_entropy(model(pixel_values=x[i * BATCH : (i + 1) * BATCH]), y[i * BATCH : (i + 1) * BATCH])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return clock.times


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--arch", default="vit-tiny-c7", help="a scratch ViT (default: the vision configs' backbone)")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default: benchmarks/results/)")
    args = parser.parse_args(argv)
    steps, rounds, warmup = (12, 2, 2) if args.quick else (30, 5, 3)  # 5 rounds: a shared CPU slows whole rounds
    data = ROOT / "data" / "fashion-mnist"
    images = np.load(data / "train-images.npy", allow_pickle=False)[: steps * BATCH]
    labels = np.load(data / "train-labels.npy", allow_pickle=False)[: steps * BATCH].tolist()
    items = list(images)
    _, reference = build(args.arch, None)
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    per_step: dict[str, list[list[float]]] = {loop: [] for loop in LOOPS}
    for r in range(rounds):
        for loop in LOOPS[r % len(LOOPS) :] + LOOPS[: r % len(LOOPS)]:
            if loop == "plain":
                times = run_plain(args.arch, state, items, labels, steps)
            else:
                times = run_fit(args.arch, state, items, labels, steps, loop)
            per_step[loop].append(list(np.diff(times[warmup:])))
            print(
                f"round {r + 1}/{rounds} {loop}: {BATCH * len(per_step[loop][-1]) / sum(per_step[loop][-1]):.0f} img/s"
            )
    results: dict[str, Any] = {"arch": args.arch, "batch": BATCH, "steps": steps, "warmup": warmup, "rounds": rounds}
    for loop, runs in per_step.items():
        best = np.min(np.array(runs), axis=0)  # each step's fastest time over the rounds
        results[loop] = {
            "images_per_s": round(BATCH * len(best) / float(best.sum()), 1),
            "median_round_images_per_s": round(float(np.median([BATCH * len(x) / sum(x) for x in runs])), 1),
        }
    plain = results["plain"]["images_per_s"]
    ratios = {f"{loop}_vs_plain": round(results[loop]["images_per_s"] / plain, 3) for loop in LOOPS if loop != "plain"}
    ratios["fit_vs_before"] = round(results["fit"]["images_per_s"] / results["before"]["images_per_s"], 2)
    ratios["fit_trivial_vs_before"] = round(
        results["fit_trivial"]["images_per_s"] / results["before"]["images_per_s"], 2
    )
    results |= {"ratios": ratios, "goal_fit_vs_plain": GOAL, "meets_goal": ratios["fit_vs_plain"] >= GOAL}
    results["machine"] = machine_info()
    for key, value in ratios.items():
        print(f"{key}: {value}")
    path = args.out or write_result("vision-loop", results)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, default=float) + "\n")
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
