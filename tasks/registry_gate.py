"""The promotion gate's decision, pure: the checks a challenger must pass and the record of what was decided.

No registry calls here: `tasks.promote` gathers the inputs and applies the decision; this module only judges.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class Decision:
    """One promotion or rollback: what was compared, what was decided and why, by whom, when."""

    model: str
    action: str  # promote | rollback
    outcome: str  # promoted | refused | rolled_back
    challenger: str | None
    champion_before: str | None
    champion_after: str | None
    user: str
    time: str
    metric: str | None = None
    margin: float | None = None
    challenger_metrics: dict[str, float] = field(default_factory=dict)
    champion_metrics: dict[str, float] | None = None
    checks: list[dict[str, Any]] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    data_version: str | None = None
    test_size: int | None = None
    host: str = field(default_factory=socket.gethostname)
    dry_run: bool = False
    log_run_id: str | None = None
    report: str | None = None  # the candidate report the decision read (`report.uri` tag of the challenger)

    @property
    def promoted(self) -> bool:
        return self.outcome == "promoted"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))


def tag_checks(tags: Mapping[str, str], int8_budget_pt: float) -> list[Check]:
    """The export conditions recorded on the version: fp32 ONNX parity, and int8 within budget or fp32 shipped."""
    parity = tags.get("onnx.parity_passed")
    ok = parity == "true"
    detail = "fp32 ONNX parity passed" if ok else f"ONNX parity not passed (onnx.parity_passed={parity!r})"
    return [Check("onnx_parity", ok, detail), int8_check(tags, int8_budget_pt)]


def int8_check(tags: Mapping[str, str], budget_pt: float) -> Check:
    shipped = tags.get("onnx.int8_shipped")
    if shipped == "false":
        return Check("int8", True, "fp32 ships as the default model")
    if shipped != "true":
        return Check("int8", False, f"no int8 decision recorded (onnx.int8_shipped={shipped!r})")
    try:
        delta = float(tags["onnx.int8_delta_pt"])
    except (KeyError, ValueError):
        return Check("int8", False, "int8 ships but its accuracy drop (onnx.int8_delta_pt) is not recorded")
    ok = delta <= budget_pt
    return Check("int8", ok, f"int8 macro-F1 drop {delta:.2f} pt {'within' if ok else 'exceeds'} budget {budget_pt} pt")


def baseline_check(tags: Mapping[str, str], required: bool) -> Check:
    """The version's own run compared it with its modality's baselines (tags `baselines.*`): a loss refuses it.
    A run that evaluated no baseline (evaluation.baselines: false) recorded nothing to judge, and says so."""
    passed, detail = tags.get("baselines.passed"), tags.get("baselines.detail", "")
    if passed is None:
        return Check("beats_baselines", True, "no baselines were evaluated in its run: not compared")
    if passed == "true":
        return Check("beats_baselines", True, f"beats its baselines: {detail}")
    if not required:
        return Check("beats_baselines", True, f"LOSES to a baseline ({detail}); allowed by registry config")
    return Check("beats_baselines", False, f"loses to a baseline of its own run: {detail}")


def compare(metric: str, challenger: float, champion: float | None, margin: float) -> Check:
    """Wins when strictly better and by at least `margin`: a tie never moves the champion."""
    if champion is None:
        return Check("beats_champion", True, f"no champion yet: first champion ({metric} {challenger:.4f})")
    delta = challenger - champion
    ok = delta > 0 and delta >= margin
    verdict = "wins" if ok else f"does not win (needs > 0 and ≥ margin {margin})"
    return Check("beats_champion", ok, f"{metric} {challenger:.4f} vs champion {champion:.4f}: {delta:+.4f}, {verdict}")


def significance_check(tags: Mapping[str, str], champion: str | None, required: bool, level: float) -> Check:
    """The candidate report's verdict (tags `report.*` on the version): is the improvement more than noise? The
    bootstrap CI of the difference must exclude 0 on the winning side and McNemar must reject at `level`. Only
    `registry.require_significance` turns a missing, stale or non-significant report into a refusal."""
    name = "significant"
    if champion is None:
        return Check(name, True, "no champion yet: nothing to be significantly better than")
    against = tags.get("report.against_version")
    stale = None
    if against is None:
        stale = "no candidate report recorded on the version"
    elif against != champion:
        stale = f"the report compares against v{against} but the champion is v{champion}"
    elif tags.get("report.level") != f"{level:g}":
        stale = f"the report tested at level {tags.get('report.level')}, the gate requires {level:g}"
    if stale:
        how = "rebuild it: `transflow report NAME@challenger`"
        return Check(name, not required, f"{stale} ({how})" + ("" if required else "; significance not required"))
    try:
        diff, low, high, p = (float(tags[k]) for k in ("report.difference", "report.ci_low", "report.ci_high",
                                                         "report.mcnemar_p"))  # fmt: skip
    except (KeyError, ValueError):
        return Check(name, not required, "the report's significance tags are incomplete (report.difference, …)")
    ok = low > 0 and p < level
    verdict = "significant" if ok else "NOT significant"
    detail = (
        f"{tags.get('report.metric', 'metric')} difference {diff:+.4f}, {1 - level:.0%} CI [{low:+.4f}, {high:+.4f}], "
        f"McNemar p={p:.3g}: {verdict} at level {level:g}"
    )
    return Check(name, ok or not required, detail + ("" if ok or required else " (significance not required)"))


def student_checks(
    tags: Mapping[str, str], metric: str, mine: float, theirs: float | None, champion: str | None
) -> list[Check] | None:
    """A distilled student (tag `distill.teacher_version`) must carry a passing distillation verdict (the teacher's
    budget, the baselines, the speed-up; `transflow distill`). Against its own teacher as champion it need not beat
    it: it replaces the margin rule with "no worse than the budget", which is the point of a faster model. None
    for any other version."""
    teacher = tags.get("distill.teacher_version")
    if teacher is None:
        return None
    shipped = tags.get("distill.ship") == "true"
    checks = [Check("distilled", shipped, tags.get("distill.reason") or "no distillation verdict recorded")]
    if champion == teacher and theirs is not None:
        budget = float(tags.get("distill.budget_pt", "0"))
        drop = 100 * (theirs - mine)
        ok = drop <= budget
        detail = (
            f"{metric} {mine:.4f} vs its teacher v{teacher} (the champion) {theirs:.4f}: "
            f"drop {drop:.2f} pt {'within' if ok else 'exceeds'} budget {budget:g} pt"
        )
        checks.append(Check("within_teacher_budget", ok, detail))
    return checks


def cite_report(checks: list[Check], reasons: list[str], report_uri: str | None) -> list[str]:
    """Every refusal names the report line that failed: the report lists the same checks, by the same names."""
    if not report_uri or all(c.ok for c in checks):
        return reasons
    return [f"report line '{c.name}': {c.detail} ({report_uri}#line-{c.name})" for c in checks if not c.ok]


def decide(checks: list[Check]) -> tuple[bool, list[str]]:
    """Promote iff every check holds; the reasons are the failures, or every check when it passes."""
    failed = [c.detail for c in checks if not c.ok]
    return not failed, failed or [c.detail for c in checks]
