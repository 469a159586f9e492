"""Promotion and rollback: gather the gate's inputs, judge, and apply the decision under the registry lock.

The gate re-evaluates the challenger and the current champion on the same test split of the same data
version (checked on disk), and moves `champion` only if every condition holds. The decision itself is
pure (`tasks.registry_gate`); the effects below go through `Tracker`, the one MLflow caller.

Concurrency and crashes: a decision is applied inside a short critical section held by a registry lock
(`tasks.registry_lock`). Inside it the champion is re-read, the decision is logged as its own MLflow run in
`<model>-promotions`, and the alias move is the single commit point. Two racing promotions therefore serialise
(the second is judged against the first one's result), and a failure before the alias move leaves the previous
champion in place. Bad input raises `RegistryError` before anything is written.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tasks.finetune import resolve_device
from tasks.registered_version import (
    CHAMPION,
    RegistryError,
    TestSplit,
    evaluate_version,
    label_set,
    load_test_split,
    require_model,
    require_version,
    resolve_challenger,
    run_config,
    same_labels,
    verify_same_data,
    verify_version_bundle,
)
from tasks.registry_gate import (
    Check,
    Decision,
    baseline_check,
    cite_report,
    compare,
    decide,
    significance_check,
    tag_checks,
)
from tasks.registry_lock import RegistryBusy, current_user, registry_lock
from tasks.tracking import Tracker, VersionRecord

LOG_SUFFIX = "-promotions"
DECISION_TAG = "promotion.decision"
PREVIOUS_TAG = "promotion.previous_champion"
MAX_ROUNDS = 3  # re-evaluate at most this often when another promotion moves the champion meanwhile


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def record_decision(
    tracker: Tracker, decision: Decision, version_tags: dict[str, dict[str, str]], move_to: str | None
) -> Decision:
    """Log the decision as its own run (intent), move the alias (the commit point), tag the versions, finish.

    A failure before the alias move changes no champion; the log run is then left FAILED (or RUNNING when the
    server is gone), which `history` reports as incomplete."""
    payload = decision.to_json()
    summary = {
        "promotion.action": decision.action,
        "promotion.outcome": decision.outcome,
        "promotion.challenger": decision.challenger or "",
        "promotion.champion_before": decision.champion_before or "",
        "promotion.champion_after": decision.champion_after or "",
        "promotion.user": decision.user,
    }
    if len(payload) <= 7900:  # MLflow's tag limit is 8000; the artifact always has the whole record
        summary[DECISION_TAG] = payload
    run_id = tracker.start_run(decision.model + LOG_SUFFIX, f"{decision.action} {decision.model}", summary)
    try:
        tracker.log_text(run_id, payload + "\n", "decision.jsonl")
        if move_to:
            tracker.set_alias(decision.model, CHAMPION, move_to)
        for version, tags in version_tags.items():
            tracker.tag_version(decision.model, version, tags | {"promotion.log_run_id": run_id})
        tracker.end_run(run_id)
    except BaseException:
        with contextlib.suppress(Exception):
            tracker.end_run(run_id, "FAILED")
        raise
    return replace(decision, log_run_id=run_id)


def promotion_tags(d: Decision) -> dict[str, dict[str, str]]:
    """What each involved version records of the decision (the log run has the whole record)."""
    if d.champion_before is not None and d.champion_before == d.challenger:
        return {}  # a concurrent promotion already made it champion: its tags stay, the log records this attempt
    stamp = {"promotion.time": d.time, "promotion.user": d.user}
    mine = {
        **stamp,
        "promotion.outcome": d.outcome,
        "promotion.metric": d.metric or "",
        "promotion.score": f"{d.challenger_metrics.get(d.metric or '', float('nan')):.4f}",
        "promotion.against": d.champion_before or "none",
        "promotion.reasons": json.dumps(d.reasons)[:4000],
    }
    tags = {d.challenger or "": mine}
    if d.promoted:
        mine[PREVIOUS_TAG] = d.champion_before or "none"
        if d.champion_before:
            tags[d.champion_before] = {**stamp, "promotion.replaced_by": d.challenger or ""}
    elif d.champion_before:
        tags[d.champion_before] = {**stamp, "promotion.defended_against": d.challenger or ""}
    return tags


@dataclass
class GateInputs:
    """Everything about the challenger the gate needs, gathered and verified once."""

    challenger: VersionRecord
    checks: list[Check]
    split: TestSplit
    data_version: str
    metric: str
    margin: float
    int8_budget_pt: float
    require_beats_baselines: bool
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    require_significance: bool = False  # registry.require_significance: the candidate report's verdict
    significance_level: float = 0.05


def promote_version(
    tracker: Tracker,
    model_name: str,
    version: str | None = None,
    metric: str | None = None,
    margin: float | None = None,
    int8_budget_pt: float | None = None,
    *,
    dry_run: bool = False,
    device: str = "cpu",
    workdir: Path | None = None,
    user: str | None = None,
) -> Decision:
    """The gate: judge `version` (default: alias `challenger`) against the champion and apply the decision.

    `metric`, `margin` and `int8_budget_pt` default to the challenger run's config (evaluation.metric,
    registry.margin, export.int8_budget_pt). The retraining flow calls this for `registry.auto_promote`.
    Raises RegistryError (nothing changed) on bad input; returns the decision, promoted or refused."""
    user = user or current_user()
    challenger = resolve_challenger(tracker, model_name, version)
    with _workdir(workdir) as work:
        champion = _champion(tracker, challenger)
        gate = gather(tracker, challenger, work, device, metric, margin, int8_budget_pt)
        gate.scores[challenger.version] = evaluate_version(tracker, challenger, gate.split, work)
        for _ in range(MAX_ROUNDS):
            if champion is not None and champion.version not in gate.scores:
                gate.scores[champion.version] = evaluate_version(tracker, champion, gate.split, work)
            decision = judge(gate, champion, user, dry_run)
            if dry_run:
                return decision
            with registry_lock(tracker, model_name):
                if tracker.alias_version(model_name, CHAMPION) == (champion.version if champion else None):
                    decision = replace(decision, time=now())
                    return record_decision(tracker, decision, promotion_tags(decision), _move(decision))
            champion = _champion(tracker, challenger, allow_self=True)  # a concurrent promotion moved it: re-judge
    raise RegistryBusy(f"{model_name}: the champion moved {MAX_ROUNDS} times while this promotion ran; try again")


def _champion(tracker: Tracker, challenger: VersionRecord, allow_self: bool = False) -> VersionRecord | None:
    """The current champion (labels checked). Being the champion already is bad input, unless a concurrent
    promotion made it so while we evaluated: that is judged (refused) and logged like any decision."""
    version = tracker.alias_version(challenger.name, CHAMPION)
    if version is None:
        return None
    if version == challenger.version:
        if not allow_self:
            raise RegistryError(f"{challenger.name} v{version} is already the champion")
        return challenger
    champion = require_version(tracker, challenger.name, version)
    same_labels(challenger, champion)
    return champion


def gather(
    tracker: Tracker,
    challenger: VersionRecord,
    work: Path,
    device: str,
    metric: str | None,
    margin: float | None,
    int8_budget_pt: float | None,
) -> GateInputs:
    """Verify the challenger's bundle and data, load its test split, and settle the gate's settings."""
    label_set(challenger)
    bundle = verify_version_bundle(tracker, challenger, work)
    cfg = run_config(tracker, challenger, work)
    data = verify_same_data(cfg.data, challenger)
    metric = metric or cfg.evaluation.metric
    if metric not in ("macro_f1", "accuracy"):
        raise RegistryError(f"unknown metric {metric!r}: expected macro_f1 or accuracy")
    return GateInputs(
        challenger,
        [bundle, data],
        load_test_split(cfg, resolve_device(device)),
        challenger.tags["data_version"],
        metric,
        cfg.registry.margin if margin is None else margin,
        cfg.export.int8_budget_pt if int8_budget_pt is None else int8_budget_pt,
        cfg.registry.require_beats_baselines,
        require_significance=cfg.registry.require_significance,
        significance_level=cfg.registry.significance_level,
    )


def judge(gate: GateInputs, champion: VersionRecord | None, user: str, dry_run: bool) -> Decision:
    mine = gate.scores[gate.challenger.version]
    theirs = gate.scores[champion.version] if champion else None
    checks = [*gate.checks]
    if champion and champion.version == gate.challenger.version:
        checks.append(Check("not_champion", False, f"v{champion.version} became the champion meanwhile"))
    elif champion:
        checks.append(same_labels(gate.challenger, champion))
    checks += tag_checks(gate.challenger.tags, gate.int8_budget_pt)
    checks.append(baseline_check(gate.challenger.tags, gate.require_beats_baselines))
    checks.append(compare(gate.metric, mine[gate.metric], theirs[gate.metric] if theirs else None, gate.margin))
    before = champion.version if champion else None
    tags = gate.challenger.tags
    checks.append(significance_check(tags, before, gate.require_significance, gate.significance_level))
    promote, reasons = decide(checks)
    reasons = cite_report(checks, reasons, tags.get("report.uri"))
    return Decision(
        model=gate.challenger.name,
        action="promote",
        outcome="promoted" if promote else "refused",
        challenger=gate.challenger.version,
        champion_before=before,
        champion_after=gate.challenger.version if promote else before,
        user=user,
        time=now(),
        metric=gate.metric,
        margin=gate.margin,
        challenger_metrics=mine,
        champion_metrics=theirs,
        checks=[asdict(c) for c in checks],
        reasons=reasons,
        data_version=gate.data_version,
        test_size=len(gate.split.labels),
        dry_run=dry_run,
        report=tags.get("report.uri"),
    )


def _move(decision: Decision) -> str | None:
    return decision.challenger if decision.promoted else None


@contextlib.contextmanager
def _workdir(workdir: Path | None) -> Iterator[Path]:
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        yield workdir
        return
    with tempfile.TemporaryDirectory(prefix="transflow-promote-") as tmp:
        yield Path(tmp)


def rollback(
    tracker: Tracker, model_name: str, reason: str = "", *, dry_run: bool = False, user: str | None = None
) -> Decision:
    """Move `champion` back to the version it replaced (recorded on it at promotion), logged like a promotion."""
    require_model(tracker, model_name)
    with contextlib.nullcontext() if dry_run else registry_lock(tracker, model_name):
        current = tracker.alias_version(model_name, CHAMPION)
        if current is None:
            raise RegistryError(f"{model_name} has no champion to roll back")
        previous = require_version(tracker, model_name, current).tags.get(PREVIOUS_TAG, "none")
        if previous == "none":
            raise RegistryError(f"{model_name} v{current} was the first champion: there is no previous one")
        require_version(tracker, model_name, previous)
        note = f"rolled back from v{current} to v{previous}" + (f": {reason}" if reason else "")
        decision = Decision(
            model=model_name,
            action="rollback",
            outcome="rolled_back",
            challenger=None,
            champion_before=current,
            champion_after=previous,
            user=user or current_user(),
            time=now(),
            reasons=[note],
            dry_run=dry_run,
        )
        if dry_run:
            return decision
        stamp = {"promotion.time": decision.time, "promotion.user": decision.user}
        tags = {
            current: {**stamp, "promotion.outcome": "rolled_back", "promotion.rolled_back_to": previous},
            previous: {**stamp, "promotion.restored_from": current},
        }
        return record_decision(tracker, decision, tags, previous)


def history(tracker: Tracker, model_name: str) -> list[dict[str, Any]]:
    """Every decision on the model, oldest first: the decision record plus its log run id and status
    (FINISHED = applied; FAILED or RUNNING = the process or the server failed midway)."""
    runs = tracker.runs(model_name + LOG_SUFFIX)
    if not runs and not tracker.model_exists(model_name):
        raise RegistryError(f"no registered model named {model_name!r} and no promotion log for it")
    out = []
    with tempfile.TemporaryDirectory(prefix="transflow-history-") as tmp:
        for run in runs:
            raw = run.tags.get(DECISION_TAG)
            if raw is None:
                path = tracker.run_artifact(run.run_id, "decision.jsonl", Path(tmp) / run.run_id)
                raw = path.read_text() if path else "{}"
            out.append(json.loads(raw) | {"log_run_id": run.run_id, "run_status": run.status})
    return out
