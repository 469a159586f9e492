"""The gate's significance check on the candidate report's tags: refused when required and not significant (or
the report is stale or missing), and every refusal names the report line, by the gate check's own name."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tasks.promote import GateInputs, judge
from tasks.registry_gate import significance_check
from tasks.tracking import VersionRecord

URI = "runs:/abc/report/report.html"


def report_tags(low: float, p: float, against: str = "1", level: str = "0.05") -> dict[str, str]:
    return {"report.against_version": against, "report.metric": "macro_f1", "report.difference": "0.0100",
            "report.ci_low": str(low), "report.ci_high": "0.03", "report.level": level, "report.mcnemar_p": str(p),
            "report.uri": URI}  # fmt: skip


BASE = {"onnx.parity_passed": "true", "onnx.int8_shipped": "false", "baselines.passed": "true", "classes": "[\"a\"]",
        "baselines.detail": "ok"}  # fmt: skip


def gate(tags: dict[str, str], required: bool = True) -> GateInputs:
    record = VersionRecord("m", "2", "run", BASE | tags, [], "src")
    return GateInputs(record, [], SimpleNamespace(labels=[0] * 50), "dv", "macro_f1", 0.0, 0.5, True,
                      {"2": {"macro_f1": 0.71, "accuracy": 0.7}, "1": {"macro_f1": 0.70, "accuracy": 0.7}},
                      require_significance=required, significance_level=0.05)  # fmt: skip


CHAMPION = VersionRecord("m", "1", "run1", {"classes": '["a"]'}, ["champion"], "src")


def test_a_non_significant_challenger_is_refused_and_the_report_line_is_named() -> None:
    decision = judge(gate(report_tags(low=-0.004, p=0.41)), CHAMPION, "me", dry_run=True)
    assert decision.outcome == "refused" and decision.report == URI
    assert decision.reasons == [
        "report line 'significant': macro_f1 difference +0.0100, 95% CI [-0.0040, +0.0300], McNemar p=0.41: "
        f"NOT significant at level 0.05 ({URI}#line-significant)"
    ]


def test_significant_challenger_passes_and_not_required_only_notes_it() -> None:
    assert judge(gate(report_tags(low=0.002, p=0.01)), CHAMPION, "me", dry_run=True).promoted
    relaxed = judge(gate(report_tags(low=-0.004, p=0.41), required=False), CHAMPION, "me", dry_run=True)
    assert relaxed.promoted
    line = next(c for c in relaxed.checks if c["name"] == "significant")
    assert line["ok"] and "significance not required" in line["detail"]


@pytest.mark.parametrize(
    ("tags", "why"),
    [
        ({}, "no candidate report recorded"),
        (report_tags(0.01, 0.001, against="7"), "compares against v7 but the champion is v1"),
        (report_tags(0.01, 0.001, level="0.1"), "tested at level 0.1, the gate requires 0.05"),
    ],
)
def test_missing_or_stale_report_refuses_only_when_required(tags: dict[str, str], why: str) -> None:
    check = significance_check(tags, "1", True, 0.05)
    assert not check.ok and why in check.detail and "transflow report" in check.detail
    assert significance_check(tags, "1", False, 0.05).ok


def test_first_champion_needs_no_significance() -> None:
    assert significance_check({}, None, True, 0.05).ok
    assert judge(gate({}), None, "me", dry_run=True).promoted
