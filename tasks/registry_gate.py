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


def decide(checks: list[Check]) -> tuple[bool, list[str]]:
    """Promote iff every check holds; the reasons are the failures, or every check when it passes."""
    failed = [c.detail for c in checks if not c.ok]
    return not failed, failed or [c.detail for c in checks]
