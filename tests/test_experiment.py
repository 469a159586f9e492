"""The transfer experiment's plan and verdicts (the runs themselves are the flows tested elsewhere)."""

from __future__ import annotations

from flows.experiment import Arm, arms, full_only, verdicts


def test_arms_skip_the_supervised_backbone_on_its_own_source_task_and_run_staged_first() -> None:
    plan = arms(["digits", "fashion-1pct"], ["scratch", "supervised"])
    assert Arm("fashion-1pct", "supervised", "staged") not in plan
    assert Arm("digits", "supervised", "full") in plan
    assert len(plan) == 6
    assert plan[0] == Arm("fashion-1pct", "scratch", "staged")
    assert [a.schedule for a in plan if a.target == "digits"] == ["staged", "staged", "full", "full"]


def test_full_only_keeps_the_epoch_budget_and_the_last_stage_settings() -> None:
    stages = [
        {"kind": "probe", "epochs": 3, "lr": 3e-3},
        {"kind": "full", "epochs": 5, "lr": 5e-4, "layer_decay": 0.75},
    ]
    assert full_only(stages) == [{"kind": "full", "name": "full", "epochs": 8, "lr": 5e-4, "layer_decay": 0.75}]


def test_verdicts_answer_the_goals_from_the_numbers_even_when_partial() -> None:
    rows = [
        {"target": "fashion-1pct", "init": "scratch", "schedule": "staged", "test_accuracy": 0.50},
        {"target": "fashion-1pct", "init": "scratch", "schedule": "full", "test_accuracy": 0.55},
        {"target": "fashion-1pct", "init": "mim", "schedule": "staged", "test_accuracy": 0.60},
    ]
    out = verdicts(rows)
    assert out["fashion-1pct: mim vs scratch"] == "+5.0 pt (misses +10 pt)"
    assert out["fashion-1pct: staged vs full (scratch)"] == "-5.0 pt"
    assert "fashion-1pct: staged vs full (mim)" not in out
