"""Training throughput side by side in one run: our `models.trainer.fit` vs a minimal hand-written PyTorch loop
vs Hugging Face `transformers.Trainer`; then dynamic vs fixed max-length padding; then a profile of `fit`.

Same model (the packaged MiniLM, `TextAdapter(max_length=64).build("minilm", 3)`, identical initial weights),
same real tweets (`data/tweets/train.jsonl`), same batches in the same order, batch 32, fp32, AdamW (lr 5e-5,
weight decay 0.01 on matrices, betas 0.9/0.999, eps 1e-8), linear decay without warm-up, gradient clipping at 1.0,
the same number of optimizer steps and the same torch thread count. The first `warmup` steps of every loop are run
but not timed; the timed window runs from the end of step `warmup` to the end of the last step, so it includes
collation (ours and plain: `TextAdapter.collate`; Trainer: `DataCollatorWithPadding`), forward, backward,
clipping, the optimizer and scheduler, and each loop's own per-step bookkeeping (progress bars, loss sync).
Loops run in rounds, their order rotated each round; the figure per loop adds up each step's fastest time over
the rounds (the same batch every round; contention only slows steps down), the median over rounds is kept too.

`Trainer` appears twice: with its defaults (for torch ≥ 2.8 that is the fused AdamW kernel) and with
`optim="adamw_torch"`, the same optimizer implementation the other two loops use.

    python -m benchmarks.bench_training [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import itertools
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from benchmarks.common import machine_info, write_result
from models.batching import Batches, shuffled

ROOT = Path(__file__).resolve().parents[1]
MAX_LENGTH = 64
LR, WEIGHT_DECAY = 5e-5, 0.01
LOOPS = ("ours", "plain", "trainer", "trainer_adamw_torch", "ours_fixed_padding")
GOALS = {"ours_vs_plain": 0.97, "ours_vs_trainer": 1.0}


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
    from flows.config import DataConfig
    from models.text import TextAdapter
    from tasks.data import load_dataset

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


# --- the three loops -----------------------------------------------------------------------------------------


def run_ours(work: Workload, workdir: Path, collate: Callable | None = None) -> dict[str, Any]:
    from models.trainer import FitPlan, fit

    model, clock = work.fresh_model(), Clock(work.warmup, work.batch_size)
    train = TimedBatches(work.batches(collate), clock)
    val = EndMarker(
        Batches(work.ids[: work.batch_size], work.labels[: work.batch_size], 64, work.adapter.collate),
        clock,
        work.total_steps,
    )
    plan = FitPlan(epochs=1, warmup_ratio=0.0, max_grad_norm=1.0, device="cpu")
    with optimizer_seen() as seen:
        fit(model, adamw_groups(model), lambda epoch: train, val, plan, workdir / "ours.safetensors", title="ours")
    return clock.result() | {"optimizer": seen[0] if seen else "?"}


@contextlib.contextmanager
def optimizer_seen() -> Iterator[list[str]]:
    """Which optimizer implementation a loop really stepped (fit builds its own)."""
    seen: list[str] = []
    handle = register_optimizer_step_pre_hook(
        lambda opt, *_: seen.append(describe_optimizer(opt)) if not seen else None
    )
    try:
        yield seen
    finally:
        handle.remove()


def plain_loop(model: torch.nn.Module, batches: Sequence, total_steps: int, clock: Clock) -> None:
    """The minimal loop: AdamW + linear decay + clipping, nothing else."""
    groups = adamw_groups(model)
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, (total_steps - s) / total_steps))
    model.train()
    clock.mark()
    for inputs, labels in batches:
        loss = F.cross_entropy(model(**inputs), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        clock.mark()


def run_plain(work: Workload, workdir: Path) -> dict[str, Any]:
    clock = Clock(work.warmup, work.batch_size)
    with optimizer_seen() as seen:
        plain_loop(work.fresh_model(), work.batches(), work.total_steps, clock)
    return clock.result() | {"optimizer": seen[0] if seen else "?"}


class _Examples(torch.utils.data.Dataset):
    def __init__(self, ids: list[list[int]], labels: list[int]):
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def run_trainer(work: Workload, workdir: Path, optim: str | None = None) -> dict[str, Any]:
    from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments

    clock = Clock(work.warmup, work.batch_size)

    class StepClock(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock.mark()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock.mark()

    class InOrder(Trainer):
        """Same batches as the other loops: the dataset is already shuffled, so read it in order."""

        def _get_train_sampler(self, *args: Any, **kwargs: Any) -> torch.utils.data.Sampler:
            return torch.utils.data.SequentialSampler(self.train_dataset)

    model = work.fresh_model()
    model.accepts_loss_kwargs = False  # our forward takes **inputs: do not pass num_items_in_batch into it
    extra = {"optim": optim} if optim else {}
    args = TrainingArguments(
        output_dir=str(workdir / "trainer"),
        per_device_train_batch_size=work.batch_size,
        max_steps=work.total_steps,
        learning_rate=LR,
        weight_decay=WEIGHT_DECAY,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        lr_scheduler_type="linear",
        warmup_steps=0,
        max_grad_norm=1.0,
        report_to=[],
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        remove_unused_columns=False,  # our forward takes **inputs: keep input_ids and attention_mask
        use_cpu=True,
        seed=0,
        **extra,
    )
    trainer = InOrder(
        model=model,
        args=args,
        train_dataset=_Examples(work.ids, work.labels),
        data_collator=DataCollatorWithPadding(work.adapter.tokenizer),
        compute_loss_func=lambda logits, labels, num_items_in_batch=None: F.cross_entropy(logits, labels),
        callbacks=[StepClock()],
    )
    trainer.train()
    out = clock.result()
    out["optimizer"] = describe_optimizer(getattr(trainer.optimizer, "optimizer", trainer.optimizer))
    return out


def describe_optimizer(optimizer: torch.optim.Optimizer) -> str:
    d = optimizer.defaults
    kind = "fused" if d.get("fused") else "foreach" if d.get("foreach") else "default (for-loop on CPU)"
    return f"{type(optimizer).__name__} {kind}"


RUNNERS: dict[str, Callable[[Workload, Path], dict[str, Any]]] = {
    "ours": run_ours,
    "plain": run_plain,
    "trainer": run_trainer,
    "trainer_adamw_torch": lambda w, d: run_trainer(w, d, "adamw_torch"),
    "ours_fixed_padding": lambda w, d: run_ours(w, d, fixed_collate(w.adapter.tokenizer.pad_token_id, MAX_LENGTH)),
}


def rotated(names: Sequence[str], r: int) -> list[str]:
    """Round r runs the loops in order shifted by r, so no loop always runs first (cold) or last."""
    k = r % len(names)
    return list(names[k:]) + list(names[:k])


def best_of_rounds(runs: list[dict[str, Any]]) -> float | None:
    """samples/s from each step's fastest time over the rounds. Every round feeds a loop the same batches in the
    same order, and contention from other processes only ever slows a step down, so the per-step minimum is the
    least noisy estimate on a shared machine (one round: the plain total)."""
    if not all("step_s" in r and "samples" in r for r in runs) or len({len(r["step_s"]) for r in runs}) != 1:
        return None
    fastest = [min(times) for times in zip(*(r["step_s"] for r in runs), strict=True)]
    return runs[0]["samples"] / sum(fastest)


def summarise(per_round: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per loop: best-of-rounds and median-of-rounds samples/s; the ratios (from best-of-rounds) and the goals."""
    loops = {}
    for name, runs in per_round.items():
        median = statistics.median(r["samples_per_s"] for r in runs)
        best = best_of_rounds(runs)
        loops[name] = {
            "samples_per_s": best if best is not None else median,
            "samples_per_s_median_of_rounds": median,
            "samples_per_s_rounds": [r["samples_per_s"] for r in runs],
            "median_step_s": statistics.median(r["median_step_s"] for r in runs),
            "threads": sorted({r["threads"] for r in runs}, key=str),
            **({"optimizer": runs[0]["optimizer"]} if "optimizer" in runs[0] else {}),
        }
    sps = {name: v["samples_per_s"] for name, v in loops.items()}
    pairs = {
        "ours_vs_plain": ("ours", "plain"),
        "ours_vs_trainer": ("ours", "trainer"),
        "ours_vs_trainer_same_optimizer": ("ours", "trainer_adamw_torch"),
        "dynamic_padding_speedup": ("ours", "ours_fixed_padding"),
    }
    ratios = {k: sps[a] / sps[b] for k, (a, b) in pairs.items() if a in sps and b in sps}
    goals = {
        k: {"target": f"≥ {v:.2f}×", "value": ratios[k], "met": ratios[k] >= v} for k, v in GOALS.items() if k in ratios
    }
    return {"loops": loops, "ratios": ratios, "goals": goals}


# --- profile of fit's hot path -------------------------------------------------------------------------------


@contextlib.contextmanager
def phase_timers(model: torch.nn.Module) -> Iterator[dict[str, float]]:
    """Seconds spent per phase of a training step, by wrapping what `fit` calls (restored on exit)."""
    import rich.progress

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
    from torch.profiler import ProfilerActivity, profile

    from models.trainer import FitPlan, fit

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


# --- entry point ---------------------------------------------------------------------------------------------


def run(
    data: Path,
    batch_size: int,
    warmup: int,
    steps: int,
    rounds: int,
    profile_steps: int,
    threads: int | None,
    loops: Sequence[str] = LOOPS,
) -> dict[str, Any]:
    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    work = load_workload(data, batch_size, warmup, steps)
    per_round: dict[str, list[dict[str, Any]]] = {name: [] for name in loops}
    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        for r in range(rounds):
            for name in rotated(loops, r):
                gc.collect()
                torch.manual_seed(r)
                result = RUNNERS[name](work, Path(tmp))
                per_round[name].append(result)
                print(
                    f"round {r + 1}/{rounds} {name:<20} {result['samples_per_s']:7.1f} samples/s "
                    f"(threads {result['threads']})"
                )
        profile = profile_fit(work, Path(tmp), profile_steps) if profile_steps else None
    out = summarise(per_round)
    out["padding"] = padding_stats(work.ids, batch_size, MAX_LENGTH)
    out["profile"] = profile
    out["setup"] = {
        "model": "all-MiniLM-L6-v2 (packaged) + mean pool + linear head, 3 classes",
        "data": str(data / "train.jsonl"),
        "examples": len(work.ids),
        "batch_size": batch_size,
        "max_length": MAX_LENGTH,
        "precision": "fp32",
        "warmup_steps_untimed": warmup,
        "timed_steps": steps,
        "rounds": rounds,
        "threads": threads,
        "device": "cpu",
    }
    return out


def print_table(results: dict[str, Any]) -> None:
    print(f"\ntraining throughput — {results['setup']}")
    for name, r in results["loops"].items():
        print(f"  {name:<22} {r['samples_per_s']:8.2f} samples/s   median step {r['median_step_s']:.3f}s")
    for name, v in results["ratios"].items():
        goal = results["goals"].get(name)
        mark = f"  goal {goal['target']}: {'met' if goal['met'] else 'NOT met'}" if goal else ""
        print(f"  {name:<32} {v:6.3f}×{mark}")
    if results.get("profile"):
        p = results["profile"]
        print(f"profile of fit ({p['steps']} steps, {p['step_s']:.2f}s/step):")
        for k, v in p["phases_pct"].items():
            print(f"  {k:<20} {v:5.1f}%")
        print("  AdamW step ms:", {k: round(v, 1) for k, v in p["optimizer_step_ms"].items()})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="1 round of 1+3 steps, no same-optimizer Trainer run, profile 2 steps"
    )
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "tweets")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads for every loop (default: torch's)")
    parser.add_argument("--loops", nargs="+", choices=LOOPS, default=None, help="default: all (quick: all but one)")
    args = parser.parse_args(argv)
    warmup, steps, rounds, profile_steps = (1, 3, 1, 2) if args.quick else (2, 10, 2, 4)
    loops = args.loops or [n for n in LOOPS if not (args.quick and n == "trainer_adamw_torch")]
    results = run(args.data, args.batch_size, warmup, steps, rounds, profile_steps, args.threads, loops)
    results["machine"] = machine_info()
    print_table(results)
    print(f"wrote {write_result('training', results)}")
    return results


if __name__ == "__main__":
    main()
