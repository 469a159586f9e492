"""Promotion and rollback: gather the gate's inputs, judge, and apply the decision under the registry lock.

The gate re-evaluates the challenger and the current champion on the same test split of the same data
version (checked on disk), and moves `champion` only if every condition holds. The decision itself is
pure (`tasks.registry_gate`); the effects go through `Tracker`, the one MLflow caller.

Concurrency and crashes: a decision is applied under the fenced, leased lock (`tasks.registry_lock`) as a
resumable sequence (`tasks.promotion_commit`: log, intent, alias, tags, event). Inside the lock, half-done
decisions of earlier processes are completed first, then the champion is re-read: two racing promotions
serialise (the second is judged against the first one's result), and a process that dies at any step leaves a
registry that the next promote, rollback or `--recover` makes consistent. Bad input raises `RegistryError`
before anything is written.
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

from tasks.evaluate import TestSplit, evaluate_version, load_test_split
from tasks.finetune import resolve_device
from tasks.promotion_commit import ABANDONED_TAG, DECISION_TAG, PREVIOUS_TAG, Notify, commit, decision_tags, recover
from tasks.registered_version import (
    CHAMPION,
    RegistryError,
    label_set,
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
    student_checks,
    tag_checks,
)
from tasks.registry_lock import ANCHOR_RUN_TAG, LOG_SUFFIX, RegistryBusy, current_user, registry_lock
from tasks.tracking import Tracker, VersionRecord

MAX_ROUNDS = 3  # re-evaluate at most this often when another promotion moves the champion meanwhile


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def promotion_tags(d: Decision) -> dict[str, dict[str, str]]:
    """What each involved version records of a promotion decision (see `promotion_commit.decision_tags`)."""
    return decision_tags(d)


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
    notify: Notify | None = None,
) -> Decision:
    """The gate: judge `version` (default: alias `challenger`) against the champion and apply the decision.

    `metric`, `margin` and `int8_budget_pt` default to the challenger run's config (evaluation.metric,
    registry.margin, export.int8_budget_pt). The retraining flow calls this for `registry.auto_promote`.
    `notify` sends the `transflow.model.promoted` event once the champion moved (the flows pass it).
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
            applied = apply_decision(tracker, decision, notify)
            if applied is not None:
                return applied
            champion = _champion(tracker, challenger, allow_self=True)  # a concurrent promotion moved it: re-judge
    raise RegistryBusy(f"{model_name}: the champion moved {MAX_ROUNDS} times while this promotion ran; try again")


def apply_decision(tracker: Tracker, decision: Decision, notify: Notify | None = None) -> Decision | None:
    """Under the lock: complete half-done decisions, then commit `decision` if the champion is still the one it
    was judged against. None when the champion moved meanwhile (judge again). A crashed earlier attempt of this
    very promotion, completed by the recovery, is returned as the decision."""
    with registry_lock(tracker, decision.model) as lease:
        for done in recover(tracker, decision.model, lease, notify):
            if decision.promoted and done.promoted and done.challenger == decision.challenger:
                return done
        if tracker.alias_version(decision.model, CHAMPION) != decision.champion_before:
            return None
        return commit(tracker, lease, replace(decision, time=now()), notify)


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
    before = champion.version if champion else None
    tags = gate.challenger.tags
    theirs_metric = theirs[gate.metric] if theirs else None
    student = student_checks(tags, gate.metric, mine[gate.metric], theirs_metric, before) or []
    if not any(c.name == "within_teacher_budget" for c in student):  # a student of the champion: no margin to beat
        checks.append(compare(gate.metric, mine[gate.metric], theirs_metric, gate.margin))
        checks.append(significance_check(tags, before, gate.require_significance, gate.significance_level))
    checks += student
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


@contextlib.contextmanager
def _workdir(workdir: Path | None) -> Iterator[Path]:
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        yield workdir
        return
    with tempfile.TemporaryDirectory(prefix="transflow-promote-") as tmp:
        yield Path(tmp)


def rollback(
    tracker: Tracker,
    model_name: str,
    reason: str = "",
    *,
    dry_run: bool = False,
    user: str | None = None,
    notify: Notify | None = None,
) -> Decision:
    """Move `champion` back to the version it replaced (recorded on it at promotion), logged like a promotion.
    Half-done decisions are completed first, so the previous champion is the true one whatever step of the
    last promotion a crash interrupted; when that completes an interrupted rollback, it is this call's rollback
    (run it again to walk further back). A dry run changes nothing and so completes nothing."""
    require_model(tracker, model_name)
    if dry_run:
        return _rollback_decision(tracker, model_name, reason, user, dry_run=True)
    with registry_lock(tracker, model_name) as lease:
        completed = [d for d in recover(tracker, model_name, lease, notify) if d.outcome == "rolled_back"]
        if completed:
            return completed[-1]
        return commit(tracker, lease, _rollback_decision(tracker, model_name, reason, user), notify)


def recover_model(tracker: Tracker, model_name: str, notify: Notify | None = None) -> list[Decision]:
    """`transflow promote --recover MODEL`: complete every half-done promotion or rollback of the model."""
    require_model(tracker, model_name)
    with registry_lock(tracker, model_name) as lease:
        return recover(tracker, model_name, lease, notify)


def _rollback_decision(
    tracker: Tracker, model_name: str, reason: str, user: str | None, dry_run: bool = False
) -> Decision:
    current = tracker.alias_version(model_name, CHAMPION)
    if current is None:
        raise RegistryError(f"{model_name} has no champion to roll back")
    previous = require_version(tracker, model_name, current).tags.get(PREVIOUS_TAG, "none")
    if previous == "none":
        raise RegistryError(f"{model_name} v{current} was the first champion: there is no previous one")
    require_version(tracker, model_name, previous)
    note = f"rolled back from v{current} to v{previous}" + (f": {reason}" if reason else "")
    return Decision(
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


def history(tracker: Tracker, model_name: str) -> list[dict[str, Any]]:
    """Every decision on the model, oldest first: the decision record plus its log run id and status
    (FINISHED = applied; RUNNING = recorded, not yet completed: the next promote/rollback/--recover completes it;
    FAILED = not applied, `abandoned` says why)."""
    runs = tracker.runs(model_name + LOG_SUFFIX)
    if not runs and not tracker.model_exists(model_name):
        raise RegistryError(f"no registered model named {model_name!r} and no promotion log for it")
    out = []
    with tempfile.TemporaryDirectory(prefix="transflow-history-") as tmp:
        for run in runs:
            if ANCHOR_RUN_TAG in run.tags:  # the lock's anchor run, not a decision
                continue
            raw = run.tags.get(DECISION_TAG)
            if raw is None:
                path = tracker.run_artifact(run.run_id, "decision.jsonl", Path(tmp) / run.run_id)
                raw = path.read_text() if path else "{}"
            entry = json.loads(raw) | {"log_run_id": run.run_id, "run_status": run.status}
            out.append(entry | ({"abandoned": run.tags[ABANDONED_TAG]} if ABANDONED_TAG in run.tags else {}))
    return out
