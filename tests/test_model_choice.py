"""Which weights a run ships, and whether it may: best stage by validation, and the baseline verdict the promotion
gate reads from the version's tags."""

from __future__ import annotations

import pytest

from flows.train import select_stage
from tasks.evaluate import baseline_verdict
from tasks.registry_gate import baseline_check

STAGES = [
    {"name": "probe", "best_val_macro_f1": 0.61},
    {"name": "partial", "best_val_macro_f1": 0.815},
    {"name": "full", "best_val_macro_f1": 0.797},
]


def test_best_stage_by_validation_is_the_model_and_the_reason_names_the_others() -> None:
    chosen = select_stage(STAGES, "macro_f1", "best")
    assert chosen["name"] == "partial" and chosen["rule"] == "best"
    assert "0.8150" in chosen["why"] and "full 0.7970" in chosen["why"] and "probe 0.6100" in chosen["why"]


def test_last_rule_and_ties_go_to_the_later_stage() -> None:
    assert select_stage(STAGES, "macro_f1", "last")["name"] == "full"
    tied = [{"name": "a", "best_val_accuracy": 0.9}, {"name": "b", "best_val_accuracy": 0.9}]
    assert select_stage(tied, "accuracy", "best")["name"] == "b"


def test_baseline_verdict_flags_every_baseline_the_model_loses_to() -> None:
    refs = {"classical": {"macro_f1": 0.959}, "frozen_probe": {"macro_f1": 0.904}}
    verdict = baseline_verdict({"macro_f1": 0.867}, refs, "macro_f1")
    assert verdict is not None and not verdict["passed"]
    assert verdict["lost_to"] == ["classical", "frozen_probe"] and "0.8670" in verdict["detail"]
    ok = baseline_verdict({"macro_f1": 0.97}, refs, "macro_f1")
    assert ok is not None and ok["passed"] and ok["lost_to"] == [] and "classical 0.9590" in ok["detail"]
    assert baseline_verdict({"macro_f1": 0.5}, {}, "macro_f1") is None


@pytest.mark.parametrize(
    ("tags", "required", "ok", "words"),
    [
        ({"baselines.passed": "false", "baselines.detail": "below classical"}, True, False, "loses to a baseline"),
        ({"baselines.passed": "false", "baselines.detail": "below classical"}, False, True, "allowed by registry"),
        ({"baselines.passed": "true", "baselines.detail": "≥ every baseline"}, True, True, "beats its baselines"),
        ({}, True, True, "no baselines were evaluated"),
    ],
)
def test_gate_reads_the_baseline_verdict_from_the_version(tags: dict, required: bool, ok: bool, words: str) -> None:
    check = baseline_check(tags, required)
    assert check.name == "beats_baselines" and check.ok is ok and words in check.detail
