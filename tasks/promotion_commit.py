"""Applying a promotion or rollback decision as a resumable sequence, under the fenced lock.

1. **log**: the decision becomes its own run in `<model>-promotions` (RUNNING), with `decision.jsonl`;
2. **intent**: the whole decision is written as the tag `promotion.intent.<run id>` on the registered model:
   the commit point. Before it, a crash changes nothing (recovery marks the run FAILED, `promotion.abandoned`);
   after it, the decision is rolled forward by whoever holds the lock next;
3. **alias**: `champion` moves (fenced by `Lease.check()`); idempotent: skipped when it already points there;
4. **tags** on the versions involved (`promotion.previous_champion`, …); setting a tag twice is harmless;
5. the run ends FINISHED;
6. **event**: `transflow.model.promoted` with an id derived from the run id (`notify`), recorded on the run
   as `promotion.event_id` so recovery does not send it again; sent twice only when the process dies between
   sending and recording it, and then with the same id, which Prefect's triggers deduplicate;
7. the intent tag is removed.

Every later `promote`, `rollback` or `transflow promote --recover MODEL` first runs `recover`, which completes
each recorded intent from the step it stopped at. An intent is abandoned (not applied) only when the champion
was since moved by hand to a version the decision was not judged against.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Callable
from dataclasses import replace

from tasks.registered_version import CHAMPION, RegistryError
from tasks.registry_gate import Decision
from tasks.registry_lock import ANCHOR_RUN_TAG, LOG_SUFFIX, Lease
from tasks.tracking import Tracker

DECISION_TAG = "promotion.decision"
PREVIOUS_TAG = "promotion.previous_champion"
INTENT_PREFIX = "promotion.intent."
EVENT_TAG = "promotion.event_id"
ABANDONED_TAG = "promotion.abandoned"
MOVES = ("promoted", "rolled_back")  # the outcomes that move `champion`

Notify = Callable[[Decision, str], None]  # (decision, event id): sends `transflow.model.promoted`


def commit(tracker: Tracker, lease: Lease, decision: Decision, notify: Notify | None = None) -> Decision:
    """Steps 1-7 for a new decision. Call with the lock held and after `recover`."""
    payload = decision.to_json()
    summary = {
        "promotion.action": decision.action,
        "promotion.outcome": decision.outcome,
        "promotion.challenger": decision.challenger or "",
        "promotion.champion_before": decision.champion_before or "",
        "promotion.champion_after": decision.champion_after or "",
        "promotion.user": decision.user,
    }
    if len(payload) <= 7900:  # MLflow's run tag limit is 8000; the artifact always has the whole record
        summary[DECISION_TAG] = payload
    run_id = tracker.start_run(decision.model + LOG_SUFFIX, f"{decision.action} {decision.model}", summary)
    decision = replace(decision, log_run_id=run_id)
    try:
        tracker.log_text(run_id, payload + "\n", "decision.jsonl")
        lease.check()
        tracker.set_model_tag(decision.model, INTENT_PREFIX + run_id, decision.to_json())
    except BaseException:
        with contextlib.suppress(Exception):  # nothing was committed: the champion is unchanged
            tracker.end_run(run_id, "FAILED")
        raise
    return complete(tracker, lease, decision, notify)


def complete(tracker: Tracker, lease: Lease, decision: Decision, notify: Notify | None = None) -> Decision:
    """Steps 3-7 of a decision whose intent is recorded; each step is skipped or harmless when already done."""
    model, run_id = decision.model, str(decision.log_run_id)
    target = decision.champion_after if decision.outcome in MOVES else None
    current = tracker.alias_version(model, CHAMPION)
    if target and current not in (decision.champion_before, target):
        why = f"champion is v{current}, not v{decision.champion_before} that this decision was judged against"
        tracker.set_tags(run_id, {ABANDONED_TAG: why})
        tracker.end_run(run_id, "FAILED")
        tracker.delete_model_tag(model, INTENT_PREFIX + run_id)
        return replace(decision, outcome="abandoned", reasons=[*decision.reasons, why])
    if target and current != target:
        lease.check()
        tracker.set_alias(model, CHAMPION, target)
    for version, tags in decision_tags(decision).items():
        tracker.tag_version(model, version, tags | {"promotion.log_run_id": run_id})
    tracker.end_run(run_id)
    if target and notify is not None and EVENT_TAG not in tracker.run_tags(run_id):
        event_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"transflow:promotion:{run_id}"))
        notify(decision, event_id)
        tracker.set_tags(run_id, {EVENT_TAG: event_id})
    tracker.delete_model_tag(model, INTENT_PREFIX + run_id)
    return decision


def recover(tracker: Tracker, model: str, lease: Lease, notify: Notify | None = None) -> list[Decision]:
    """Complete every half-done decision on `model` (oldest first) and close decision runs that died before
    their intent was recorded. Call with the lock held. Returns the decisions completed or abandoned."""
    intents = []
    for key, raw in (tracker.model_tags(model) or {}).items():
        if key.startswith(INTENT_PREFIX):
            try:
                intents.append(Decision(**json.loads(raw)))
            except (ValueError, TypeError) as exc:  # edited by hand: never guess what a damaged decision meant
                raise RegistryError(
                    f"{model}: the recorded intent {key} is damaged ({exc}); compare it with its run "
                    f"{key.removeprefix(INTENT_PREFIX)} in {model}{LOG_SUFFIX}, then complete or delete the tag"
                ) from exc
    intents.sort(key=lambda d: d.time)
    done = [complete(tracker, lease, d, notify) for d in intents]
    pending = {d.log_run_id for d in intents}
    for run in tracker.runs(model + LOG_SUFFIX, status="RUNNING"):
        if run.run_id not in pending and ANCHOR_RUN_TAG not in run.tags:
            why = "the process ended before the decision was recorded as intent: nothing changed"
            tracker.set_tags(run.run_id, {ABANDONED_TAG: why})
            tracker.end_run(run.run_id, "FAILED")
    return done


def decision_tags(d: Decision) -> dict[str, dict[str, str]]:
    """What each involved version records of the decision (the log run has the whole record)."""
    stamp = {"promotion.time": d.time, "promotion.user": d.user}
    if d.action == "rollback":
        current, previous = d.champion_before or "", d.champion_after or ""
        return {
            current: {**stamp, "promotion.outcome": "rolled_back", "promotion.rolled_back_to": previous},
            previous: {**stamp, "promotion.restored_from": current},
        }
    if d.champion_before is not None and d.champion_before == d.challenger:
        return {}  # a concurrent promotion already made it champion: its tags stay, the log records this attempt
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
