"""The promotion gate and rollback as Prefect flows, so every registry move shows up beside the runs that made
the versions, and a moved champion emits `transflow.model.promoted` (what triggers `deploy-edge`). The logic
lives in `tasks.promote`; the retraining flow calls `auto_promote` for `registry.auto_promote`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from prefect import flow

from flows.prefect_artifacts import promote_run_name, publish_decision, rollback_run_name
from tasks.events import emit_promoted
from tasks.promote import promote_version
from tasks.promote import rollback as rollback_champion
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
    )
    print(f"{model_name} v{decision.challenger}: {decision.outcome}: {'; '.join(decision.reasons)}")
    announce(decision, tracker.uri)
    publish_decision(decision.to_dict())
    return decision.to_dict()


@flow(name="rollback", log_prints=True, flow_run_name=rollback_run_name)
def rollback(
    model_name: str, reason: str = "", dry_run: bool = False, tracking_uri: str | None = None
) -> dict[str, Any]:
    """Move `champion` back to the version it replaced."""
    tracker = Tracker(resolve_tracking_uri(tracking_uri))
    decision = rollback_champion(tracker, model_name, reason, dry_run=dry_run)
    print(f"{model_name}: {decision.reasons[0]}")
    announce(decision, tracker.uri)
    publish_decision(decision.to_dict())
    return decision.to_dict()


def auto_promote(tracker: Tracker, model_name: str, version: str, device: str, workdir: Path) -> dict[str, Any]:
    """`registry.auto_promote`: the same gate as `transflow promote` on the version the retraining flow just
    registered, with that run's metric, margin and int8 budget; announces a moved champion."""
    try:
        decision = promote_version(tracker, model_name, version, device=device, workdir=workdir / "promote")
    except RegistryError as exc:  # e.g. export disabled: the version stays challenger, the run still succeeds
        return {"outcome": "not judged", "reasons": [str(exc)]}
    print(f"auto-promote {model_name} v{version}: {decision.outcome}: {'; '.join(decision.reasons)}")
    announce(decision, tracker.uri)
    publish_decision(decision.to_dict())
    return decision.to_dict()


def announce(decision: Decision, tracking_uri: str) -> None:
    """Emit `transflow.model.promoted` when `champion` really moved (promotion or rollback), never on a dry run."""
    if decision.dry_run or decision.outcome not in ("promoted", "rolled_back") or not decision.champion_after:
        return
    emit_promoted(
        decision.model,
        decision.champion_after,
        previous=decision.champion_before,
        reason="; ".join(decision.reasons),
        tracking_uri=_without_credentials(tracking_uri),
        action=decision.action,
        user=decision.user,
        log_run_id=decision.log_run_id,
    )


def _without_credentials(uri: str) -> str:
    """Events are visible to every Prefect user: never put `user:password@` of a tracking URI in one."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
