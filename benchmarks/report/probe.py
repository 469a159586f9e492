"""The probe benchmark's section and its goal: cached features vs the frozen backbone every epoch."""

from __future__ import annotations

from typing import Any

from benchmarks.report.markdown import fmt, md_table

GOAL_SPEEDUP = 5.0  # cached vs naive, per epoch after the first

TITLE = "Probe stage: cached features vs frozen backbone every epoch"


def section(r: dict[str, Any]) -> str:
    rows = [
        ["train examples", r.get("train_examples")],
        ["epochs", r.get("epochs")],
        ["feature extraction (once), s", r.get("feature_extraction_s")],
        ["cached probe, s per epoch", r.get("cached_epoch_s")],
        ["naive probe (backbone every epoch), s per epoch", r.get("naive_epoch_s")],
        ["speed-up per epoch after the first", r.get("speedup_per_epoch_after_first")],
        ["speed-up over the whole stage", r.get("speedup_whole_stage")],
    ]
    return md_table(["", "value"], rows)


def goals(r: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    """(goal, target, measured, met): bench_probe reports the ratio, the goal is stated here."""
    if "speedup_per_epoch_after_first" not in r:
        return []
    v = r["speedup_per_epoch_after_first"]
    return [("cached vs naive, per epoch after the first", "≥ 5×", fmt(v, 1) + "×", v >= GOAL_SPEEDUP)]
