"""`transflow experiment transfer`: does pretraining pay? Small ViTs pretrained on Fashion-MNIST (masked image
modelling, and supervised on its labels) against the same architecture from scratch, on low-resource targets
(the digits; Fashion-MNIST with 1% and 10% of its labels), each with the staged schedule and with a single
full fine-tune of the same epoch budget. One table (Markdown + JSON + PNG), logged to MLflow."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prefect import flow
from rich.console import Console
from rich.table import Table

from flows.pretrain import run_pretrain
from flows.retrain import retrain_from_config
from runconfig import load_config, load_pretrain_config
from tasks.evaluate import plot_transfer
from tasks.tracking import Tracker, resolve_tracking_uri

console = Console()


@dataclass(frozen=True)
class Arm:
    target: str
    init: str
    schedule: str


TARGETS = {
    "digits": ["data.path=data/digits"],
    "fashion-1pct": [
        "data.path=data/fashion-mnist",
        "data.train_limit=550",
        "data.validation_limit=1000",
        "data.test_limit=2000",
        "backbone.hflip=true",
    ],
    "fashion-10pct": [
        "data.path=data/fashion-mnist",
        "data.train_limit=5500",
        "data.validation_limit=1000",
        "data.test_limit=2000",
        "backbone.hflip=true",
    ],
}
INITS = {
    "scratch": "scratch:vit-tiny",
    "mim": "models:/vit-fashion-mim@latest",
    "supervised": "models:/vit-fashion-sup@latest",
}
PRETRAIN_CONFIGS = {"mim": "configs/pretrain-vision-mim.yaml", "supervised": "configs/pretrain-vision-supervised.yaml"}


def arms(targets: list[str], inits: list[str]) -> list[Arm]:
    """Every target × init × schedule, except the supervised backbone on Fashion-MNIST targets (it saw their
    labels). Staged arms first, smallest targets first: a run cut short still answers the main question."""
    order = {"fashion-1pct": 0, "digits": 1, "fashion-10pct": 2}
    every = [
        Arm(t, i, s)
        for t in targets
        for i in inits
        for s in ("staged", "full")
        if not (i == "supervised" and t.startswith("fashion"))
    ]
    return sorted(every, key=lambda a: (order.get(a.target, 9), a.schedule != "staged"))


def full_only(stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One full fine-tune with the staged schedule's total epochs and its last stage's settings."""
    last = dict(stages[-1])
    last.update(kind="full", name="full", epochs=sum(s["epochs"] for s in stages))
    return [last]


@flow(name="experiment-transfer", log_prints=True)
def transfer_experiment(
    base_config: str = "configs/vision-digits.yaml",
    targets: list[str] | None = None,
    inits: list[str] | None = None,
    overrides: list[str] | None = None,
    out_dir: str = "runs/experiments/transfer",
    pretrain: bool = True,
    pretrain_overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Pretrain the backbones (unless `pretrain=False`), run every arm, write and log the table."""
    started, out = time.perf_counter(), Path(out_dir)
    targets, inits = targets or list(TARGETS), inits or list(INITS)
    uri = resolve_tracking_uri(load_config(base_config, overrides or []).registry.tracking_uri)
    pretrained = {}
    for init in inits:
        if init in PRETRAIN_CONFIGS and pretrain:
            cfg = load_pretrain_config(
                PRETRAIN_CONFIGS[init], [f"registry.tracking_uri={uri}", *(pretrain_overrides or [])]
            )
            pretrained[init] = run_pretrain(cfg)
    base_stages = load_config(base_config, overrides or []).model_dump(mode="json", exclude_none=True)["stages"]
    rows = []
    for arm in arms(targets, inits):
        schedule = base_stages if arm.schedule == "staged" else full_only(base_stages)
        cfg = load_config(
            base_config,
            [
                *(overrides or []),
                *TARGETS[arm.target],
                f"backbone.uri={INITS[arm.init]}",
                f"stages={yaml.safe_dump(schedule, default_flow_style=True).strip()}",
                f"name=transfer-{arm.target}-{arm.init}-{arm.schedule}",
                "registry.enabled=false",
                "evaluation.baselines=false",
                "registry.experiment=transfer-experiment",
                f"registry.tracking_uri={uri}",
            ],
        )
        summary = retrain_from_config(cfg)
        rows.append(row_of(arm, summary))
        write_tables(rows, pretrained, out, time.perf_counter() - started)  # partial results survive an interruption
    return report(rows, pretrained, out, Tracker(uri), time.perf_counter() - started)


def row_of(arm: Arm, summary: dict[str, Any]) -> dict[str, Any]:
    return {
        "target": arm.target,
        "init": arm.init,
        "schedule": arm.schedule,
        "train_size": summary["sizes"]["train"],
        "test_accuracy": summary["test"]["accuracy"],
        "test_macro_f1": summary["test"]["macro_f1"],
        "stages": {s["name"]: s["test"]["accuracy"] for s in summary["stages"]},
        "seconds": sum(s["seconds"] for s in summary["stages"]),
        "run_id": summary["run_id"],
    }


def verdicts(rows: list[dict[str, Any]]) -> dict[str, str]:
    """The goals of the issue, answered from the numbers: transfer ≥ +10 pt at 1%/10%; staged ≥ full."""
    acc = {(r["target"], r["init"], r["schedule"]): r["test_accuracy"] for r in rows}
    out = {}
    for target in sorted({r["target"] for r in rows}):
        scratch = max(acc.get((target, "scratch", s), float("-inf")) for s in ("staged", "full"))
        for init in ("mim", "supervised"):
            best = max(acc.get((target, init, s), float("-inf")) for s in ("staged", "full"))
            if best > float("-inf") and scratch > float("-inf"):
                gain = 100 * (best - scratch)
                out[f"{target}: {init} vs scratch"] = f"{gain:+.1f} pt ({'meets' if gain >= 10 else 'misses'} +10 pt)"
        for init in ("scratch", "mim", "supervised"):
            if (target, init, "staged") in acc and (target, init, "full") in acc:
                delta = 100 * (acc[(target, init, "staged")] - acc[(target, init, "full")])
                out[f"{target}: staged vs full ({init})"] = f"{delta:+.1f} pt"
    return out


def report(rows: list[dict[str, Any]], pretrained: dict[str, Any], out: Path, tracker: Tracker, seconds: float) -> dict:
    result, table = write_tables(rows, pretrained, out, seconds)
    run_id = tracker.start_run("transfer-experiment", "transfer-table", {"kind": "experiment"})
    tracker.log_artifacts(run_id, out)
    tracker.end_run(run_id)
    console.print(table)
    for key, value in result["verdicts"].items():
        console.print(f"  {key}: {value}")
    console.print(f"wrote {out}/transfer.md, transfer.json, transfer.png")
    return result


def write_tables(rows: list[dict[str, Any]], pretrained: dict[str, Any], out: Path, seconds: float) -> tuple:
    """transfer.json, transfer.md and transfer.png for the rows so far."""
    out.mkdir(parents=True, exist_ok=True)
    result = {"rows": rows, "verdicts": verdicts(rows), "pretraining": pretrained, "seconds": round(seconds, 1)}
    (out / "transfer.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    lines = [
        "| target | train size | init | schedule | test accuracy | test macro-F1 | per stage (test acc) | s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    table = Table("target", "n", "init", "schedule", "test acc", "macro-F1", "per stage", "s", title="transfer")
    for r in rows:
        per_stage = ", ".join(f"{k} {v:.3f}" for k, v in r["stages"].items())
        cells = [
            r["target"],
            str(r["train_size"]),
            r["init"],
            r["schedule"],
            f"{r['test_accuracy']:.4f}",
            f"{r['test_macro_f1']:.4f}",
            per_stage,
            f"{r['seconds']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
        table.add_row(*cells)
    lines += ["", *(f"- {k}: {v}" for k, v in result["verdicts"].items())]
    (out / "transfer.md").write_text("\n".join(lines) + "\n")
    plot_transfer(rows, out / "transfer.png")
    return result, table
