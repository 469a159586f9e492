"""A profile of `fit`'s hot path for the training benchmark: a few steps of the real `fit` under torch.profiler with
per-phase timers, and the AdamW implementations timed on the same gradients."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import rich.progress
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.profiler import ProfilerActivity, profile

from benchmarks.training_workload import Clock, EndMarker, TimedBatches, Workload, adamw_groups
from models.batching import Batches
from models.trainer import FitPlan, fit


@contextlib.contextmanager
def phase_timers(model: torch.nn.Module) -> Iterator[dict[str, float]]:
    """Seconds spent per phase of a training step, by wrapping what `fit` calls (restored on exit)."""
    spent: dict[str, float] = {}
    patched: list[tuple[Any, str, Any, bool]] = []

    def wrap(owner: Any, name: str, phase: str) -> None:
        original = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent[phase] = spent.get(phase, 0.0) + time.perf_counter() - start

        patched.append((owner, name, original, name in vars(owner)))
        setattr(owner, name, timed)

    wrap(torch.nn.functional, "cross_entropy", "loss")
    wrap(torch.Tensor, "backward", "backward")
    wrap(torch.Tensor, "item", "loss.item()")
    wrap(torch.nn.utils, "clip_grad_norm_", "clip_grad_norm_")
    wrap(torch.optim.Optimizer, "zero_grad", "zero_grad")
    wrap(torch.optim.lr_scheduler.LambdaLR, "step", "scheduler.step")
    wrap(rich.progress.Progress, "update", "progress bar")
    step_start: list[float] = []

    def step_done(*_: Any) -> None:
        spent["optimizer.step"] = spent.get("optimizer.step", 0.0) + time.perf_counter() - step_start.pop()

    # LRScheduler re-binds optimizer.step on the instance, so time it with torch's global step hooks
    opt_pre = register_optimizer_step_pre_hook(lambda *_: step_start.append(time.perf_counter()))
    opt_post = register_optimizer_step_post_hook(step_done)
    starts: list[float] = []
    pre = model.register_forward_pre_hook(lambda m, a, k: starts.append(time.perf_counter()), with_kwargs=True)

    def forward_done(*_: Any) -> None:
        spent["forward"] = spent.get("forward", 0.0) + time.perf_counter() - starts.pop()

    post = model.register_forward_hook(forward_done)
    try:
        yield spent
    finally:
        for handle in (pre, post, opt_pre, opt_post):
            handle.remove()
        for owner, name, original, own in reversed(patched):
            if own:
                setattr(owner, name, original)
            else:  # it was inherited: drop our shadowing attribute
                delattr(owner, name)


def profile_fit(work: Workload, workdir: Path, steps: int, top: int = 12) -> dict[str, Any]:
    """A few steps of the real `fit` under torch.profiler with per-phase timers; plus AdamW implementations
    timed on the same gradients (the optimizer is the one phase whose implementation we choose)."""
    n = work.warmup + steps
    sub = Workload(
        work.adapter,
        work.proto,
        work.ids[: n * work.batch_size],
        work.labels[: n * work.batch_size],
        work.batch_size,
        work.warmup,
        steps,
    )
    model, clock, collate_times = sub.fresh_model(), Clock(sub.warmup, sub.batch_size), []
    train = TimedBatches(sub.batches(), clock, collate_times)
    val = EndMarker(Batches(sub.ids[: sub.batch_size], sub.labels[: sub.batch_size], 64, sub.adapter.collate), clock, n)

    class Window:
        """Start the profiler and phase timers when the warm-up steps are done."""

        def __init__(self) -> None:
            self.stack = contextlib.ExitStack()
            self.prof: Any = None
            self.spent: dict[str, float] = {}

        def __call__(self, epoch: int) -> Sequence:
            return self

        def __len__(self) -> int:
            return len(train)

        def __getitem__(self, i: int) -> Any:
            if i == sub.warmup and self.prof is None:
                self.prof = self.stack.enter_context(profile(activities=[ProfilerActivity.CPU]))
                self.spent = self.stack.enter_context(phase_timers(model))
                collate_times.clear()
            return train[i]

        def __iter__(self) -> Iterator[Any]:
            for i in range(len(self)):
                yield self[i]

    window = Window()

    class Stop(EndMarker):
        def _end(self) -> None:
            super()._end()
            window.stack.close()

    fit(
        model,
        adamw_groups(model),
        window,
        Stop(val.inner, clock, n),
        FitPlan(epochs=1, device="cpu"),
        workdir / "profile.safetensors",
        title="profile",
    )
    timed = clock.result()
    total = timed["seconds"]
    phases = dict(window.spent)
    phases["collate"] = sum(collate_times)
    phases["other (loop glue)"] = total - sum(phases.values())
    ops = sorted(window.prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    cpu_total = sum(e.self_cpu_time_total for e in ops) or 1.0
    return {
        "steps": steps,
        "step_s": total / steps,
        "phases_pct": {k: 100 * v / total for k, v in sorted(phases.items(), key=lambda kv: -kv[1])},
        "top_ops": [
            {"op": e.key, "self_cpu_pct": 100 * e.self_cpu_time_total / cpu_total, "calls": e.count} for e in ops[:top]
        ],
        "optimizer_step_ms": optimizer_variants(sub),
    }


def optimizer_variants(work: Workload, repeats: int = 5) -> dict[str, float]:
    """Median ms of one AdamW step over the whole model: torch's CPU default (per-tensor loop), foreach, fused."""
    model = work.fresh_model()
    inputs, labels = work.batches()[0]
    F.cross_entropy(model(**inputs), labels).backward()
    out = {}
    for name, kwargs in (
        ("default (for-loop on CPU)", {}),
        ("foreach=True", {"foreach": True}),
        ("fused=True", {"fused": True}),
    ):
        try:
            optimizer = torch.optim.AdamW(adamw_groups(model), **kwargs)
        except (RuntimeError, ValueError) as exc:
            out[name] = float("nan")
            print(f"AdamW {name}: {exc}")
            continue
        optimizer.step()  # allocate the state
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            optimizer.step()
            times.append(time.perf_counter() - start)
        out[name] = 1000 * statistics.median(times)
    return out
