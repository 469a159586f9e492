"""`watch-drift`: read the edge fleet's drift figures and, when a model version's live traffic has moved away
from its test split, emit `transflow.drift.detected` once per version within a cooldown.

Scheduled hourly (prefect.yaml). For each bundle the fleet serves it adds the servers' live counts up and scores
every statistic with the edge's own PSI (`transflow_edge.drift`); a statistic with PSI ≥ `threshold` over at
least `min_count` live inputs has drifted. Advisory by default: the event carries the figures (a Prefect
automation or trigger can act on it). With `retrain: true` it also starts the `retrain` deployment (this
config), once per event.

Exactly one event per version within the cooldown, across crashes: the state (a Prefect variable per model) first
records the event's id as not yet sent, then the event goes out with that fixed id, then the record is marked
sent. A run that died in between resends the same id, which Prefect stores once.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task

from flows.watch import start_retrain
from runconfig import load_config
from tasks.drift_watch import decide, event_id, fleet_figures, now, read_fleet, read_state, state_key, write_state
from tasks.events import emit_drift_detected


class DriftWatchError(RuntimeError):
    """The watcher has nothing to watch; the message says what to set."""


@task
def signal_drift(figure: dict[str, Any], cooldown_s: float) -> dict[str, Any]:
    """Emit the event for one drifted version unless one went out within the cooldown; returns what it did."""
    name, key, at = figure["model_name"], state_key(figure), now()
    state = read_state(name)
    verdict = decide(state.get(key), at, cooldown_s)
    if verdict == "cooldown":
        return {"action": "cooldown", "event_id": state[key]["event_id"], "since": state[key]["at"]}
    if verdict == "emit":
        state[key] = {"at": at, "event_id": event_id(name, figure["version"], figure["bundle_sha256"], at),
                      "sent": False, "bundle_sha256": figure["bundle_sha256"]}  # fmt: skip
        write_state(name, state)  # the intent first: a crash after this resends the same event id
    record = state[key]
    payload = {k: figure[k] for k in ("bundle_sha256", "psi", "counts", "drifted", "threshold", "min_count",
                                      "targets", "per_target")}  # fmt: skip
    sent = emit_drift_detected(name, figure["version"], record["event_id"], cooldown_s=cooldown_s, **payload)
    if sent is None:  # no Prefect API to send to: kept unsent, so the next run sends it
        return {"action": "not-sent", "event_id": record["event_id"], "reason": "no Prefect API reachable"}
    record["sent"] = True
    write_state(name, state)
    return {"action": "emitted" if verdict == "emit" else "resent", "event_id": record["event_id"]}


@flow(name="watch-drift", log_prints=True)
def watch_drift(
    targets: list[str] | None = None,
    config_path: str = "configs/text-tweets.yaml",
    overrides: list[str] | None = None,
    threshold: float = 0.25,
    min_count: int = 200,
    cooldown_hours: float = 24.0,
    retrain: bool = False,
    deployment: str = "retrain/retrain",
) -> dict[str, Any]:
    """Score the fleet's drift (`targets`, else the config's deploy.targets); emit and optionally retrain."""
    cfg = load_config(config_path, overrides or [])
    targets = list(targets or cfg.deploy.targets)
    if not targets:
        raise DriftWatchError(f"no edge servers to watch: pass targets, or set deploy.targets in {config_path}")
    fleet = read_fleet(targets)
    for entry in fleet:
        if "error" in entry:
            print(f"{entry['target']}: {entry['error']}")
        elif not entry["report"].get("available"):
            print(f"{entry['target']}: {entry['report'].get('reason', 'no drift figures')}")
    versions = []
    for figure in fleet_figures(fleet, threshold, min_count):
        label = f"{figure['model_name']} v{figure['version']} on {len(figure['targets'])} server(s)"
        scores = ", ".join(
            f"{k} {v if v is None else f'{v:.3f}'} (n={figure['counts'][k]})" for k, v in figure["psi"].items()
        )
        if not figure["drifted"]:
            print(f"{label}: stable; PSI {scores}")
            versions.append(figure | {"action": "stable"})
            continue
        done = signal_drift(figure, cooldown_hours * 3600)
        print(
            f"{label}: DRIFT in {', '.join(figure['drifted'])} (threshold {threshold}); {done['action']}; PSI {scores}"
        )
        if retrain and done["action"] in ("emitted", "resent") and figure["model_name"] == cfg.registry.model_name:
            key = f"transflow.retrain-drift:{figure['model_name']}:{figure['version']}:{done['event_id']}"
            tags = ["transflow", "trigger:watch-drift", f"drift:{figure['model_name']}-v{figure['version']}"]
            params = {"config_path": config_path, "overrides": list(overrides or [])}
            done["retrain"] = start_retrain(deployment, params, key, tags)
            print(f"started {deployment} run {done['retrain']['name']} [{done['retrain']['state']}]")
        versions.append(figure | done)
    return {"targets": targets, "unreadable": [e for e in fleet if "error" in e], "versions": versions,
            "threshold": threshold, "min_count": min_count, "cooldown_hours": cooldown_hours}  # fmt: skip
