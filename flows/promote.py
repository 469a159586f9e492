"""The promotion gate and rollback as Prefect flows, so every registry move shows up beside the runs that made
the versions, and a moved champion emits `transflow.model.promoted` (what triggers `deploy-edge`), once per
decision even when a crash interrupted it (`tasks.promotion_commit`). The logic lives in `tasks.promote`; the
retraining flow calls `auto_promote` for `registry.auto_promote`; `recover` completes half-done decisions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from prefect import flow

from flows.prefect_artifacts import promote_run_name, publish_decision, rollback_run_name
from tasks.events import emit_promoted
from tasks.promote import promote_version, recover_model
from tasks.promote import rollback as rollback_champion
from tasks.promotion_commit import Notify
from tasks.registered_version import RegistryError
from tasks.registry_gate import Decision
from tasks.tracking import Tracker, resolve_tracking_uri


@flow(name="promote", log_prints=True, flow_run_name=promote_run_name)
def promote(
    model_name: str,
    version: str | None = None,
    dry_run: bool = False,
    tracking_uri: str | None = None,
    metric: str | None = None,
    margin: float | None = None,
    int8_budget_pt: float | None = None,
    device: str = "cpu",
    workdir: str | None = None,
) -> dict[str, Any]:
    """Judge the challenger (or `version`) against the champion on the same test split; move `champion` if it wins."""
    tracker = Tracker(resolve_tracking_uri(tracking_uri))
    decision = promote_version(
        tracker,
        model_name,
        version,
        metric,
        margin,
        int8_budget_pt,
        dry_run=dry_run,
        device=device,
        workdir=Path(workdir) if workdir else None,
        notify=notifier(tracker.uri),
    )
    print(f"{model_name} v{decision.challenger}: {decision.outcome}: {'; '.join(decision.reasons)}")
    publish_decision(decision.to_dict())
    return decision.to_dict()


@flow(name="rollback", log_prints=True, flow_run_name=rollback_run_name)
def rollback(
    model_name: str, reason: str = "", dry_run: bool = False, tracking_uri: str | None = None
) -> dict[str, Any]:
    """Move `champion` back to the version it replaced."""
    tracker = Tracker(resolve_tracking_uri(tracking_uri))
    decision = rollback_champion(tracker, model_name, reason, dry_run=dry_run, notify=notifier(tracker.uri))
    print(f"{model_name}: {decision.reasons[0]}")
    publish_decision(decision.to_dict())
    return decision.to_dict()


@flow(name="promote-recover", log_prints=True)
def recover(model_name: str, tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """Complete every half-done promotion or rollback of `model_name` (alias, tags, event), oldest first."""
    tracker = Tracker(resolve_tracking_uri(tracking_uri))
    done = recover_model(tracker, model_name, notify=notifier(tracker.uri))
    for d in done:
        print(f"{model_name}: completed {d.action} v{d.champion_before} → v{d.champion_after}: {d.outcome}")
    return [d.to_dict() for d in done]


def auto_promote(tracker: Tracker, model_name: str, version: str, device: str, workdir: Path) -> dict[str, Any]:
    """`registry.auto_promote`: the same gate as `transflow promote` on the version the retraining flow just
    registered, with that run's metric, margin and int8 budget; announces a moved champion."""
    try:
        decision = promote_version(
            tracker, model_name, version, device=device, workdir=workdir / "promote", notify=notifier(tracker.uri)
        )
    except RegistryError as exc:  # e.g. export disabled: the version stays challenger, the run still succeeds
        return {"outcome": "not judged", "reasons": [str(exc)]}
    print(f"auto-promote {model_name} v{version}: {decision.outcome}: {'; '.join(decision.reasons)}")
    publish_decision(decision.to_dict())
    return decision.to_dict()


def notifier(tracking_uri: str) -> Notify:
    """What the commit sequence calls, once, after `champion` really moved (never on a dry run or a refusal)."""

    def announce(decision: Decision, event_id: str) -> None:
        emit_promoted(
            decision.model,
            str(decision.champion_after),
            previous=decision.champion_before,
            reason="; ".join(decision.reasons),
            tracking_uri=_without_credentials(tracking_uri),
            event_id=event_id,
            action=decision.action,
            user=decision.user,
            log_run_id=decision.log_run_id,
        )

    return announce


def _without_credentials(uri: str) -> str:
    """Events are visible to every Prefect user: never put `user:password@` of a tracking URI in one."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
