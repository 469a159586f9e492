"""The transfer experiment's plan and verdicts (the runs themselves are the flows tested elsewhere)."""

from __future__ import annotations

from flows.experiment import Arm, arms, full_only, verdicts


def test_arms_skip_backbones_that_saw_the_target_labels_and_run_the_recipe_first() -> None:
    plan = arms(["digits", "fashion-1pct"], ["scratch", "supervised", "resnet"], ("recipe", "full"))
    assert Arm("fashion-1pct", "supervised", "recipe") not in plan
    assert not any(a.init == "resnet" and a.target.startswith("fashion") for a in plan)
    assert Arm("digits", "supervised", "full") in plan
    assert Arm("digits", "resnet", "frozen") in plan, "the ResNet arm: frozen backbone + new head"
    assert plan[0] == Arm("fashion-1pct", "scratch", "recipe")
    assert [a.schedule for a in plan if a.target == "digits"] == ["recipe", "recipe", "frozen", "full", "full"]


def test_full_only_keeps_the_image_stages_step_budget_and_the_last_stage_settings() -> None:
    stages = [
        {"kind": "probe", "steps": 300, "lr": 3e-3},
        {"kind": "full", "steps": 1200, "lr": 5e-4, "layer_decay": 0.75},
    ]
    assert full_only(stages) == [{"kind": "full", "name": "full", "steps": 1200, "lr": 5e-4, "layer_decay": 0.75}]
    epochs = [{"kind": "partial", "epochs": 3}, {"kind": "full", "epochs": 5, "lr": 5e-4}]
    assert full_only(epochs) == [{"kind": "full", "name": "full", "epochs": 8, "lr": 5e-4}]


def test_verdicts_answer_the_goals_against_each_runs_own_baselines() -> None:
    def row(target: str, init: str, acc: float, pixel: float, probe: float | None = None) -> dict:
        return {
            "target": target,
            "init": init,
            "schedule": "recipe",
            "test_accuracy": acc,
            "pixel_lr_accuracy": pixel,
            "frozen_probe_accuracy": probe,
        }

    rows = [
        row("fashion-1pct", "scratch", 0.78, 0.788),
        row("fashion-1pct", "mim", 0.80, 0.788, 0.81),
        row("digits", "supervised", 0.975, 0.967),
    ]
    out = verdicts(rows)
    assert out["fashion-1pct: best arm ≥ LR on pixels + 3 pt"] == "mim/recipe +1.2 pt over 0.7880: misses by 1.8 pt"
    assert out["fashion-1pct: mim vs scratch (goal +5 pt)"] == "+2.0 pt: misses by 3.0 pt"
    assert out["fashion-1pct: scratch/recipe below its baselines"] == "LR on pixels 0.7880"
    assert out["fashion-1pct: mim/recipe below its baselines"] == "frozen probe 0.8100"
    assert out["digits: best arm ≥ 97%"] == "supervised/recipe 0.9750: meets"
