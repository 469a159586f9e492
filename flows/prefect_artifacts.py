"""What each flow run shows in the Prefect UI: artifacts and run names.

- retrain: the summary as a table artifact, and a link artifact to its MLflow run and registered version;
- promote / rollback: the decision as Markdown, keyed `promotion-<model>` so the UI shows its history;
- deploy-edge: the outcome as Markdown, keyed `deploy-<model>`.
Run names come from the parameters: `retrain/<config>/<UTC time>`, `promote/<model>/v3`, `deploy/<model>@champion`.

Publishing never fails a flow: the registry and the edge servers are the record; this is the view of it.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from prefect.logging import get_logger

log = get_logger("transflow.artifacts")
UI_STATE = Path(".transflow") / "ui" / "ui.json"  # written by `transflow ui` (flows/cli_ui.py)


def artifact_key(kind: str, model: str) -> str:
    """Prefect keys allow lowercase letters, digits and dashes only."""
    slug = re.sub(r"[^a-z0-9-]+", "-", model.lower()).strip("-") or "model"
    return f"{kind}-{slug}"[:100]


# --- run names -----------------------------------------------------------------------------------------------


def _parameters() -> dict[str, Any]:
    from prefect.runtime import flow_run

    return dict(flow_run.parameters or {})


def retrain_run_name() -> str:
    params = _parameters()
    config = Path(str(params.get("config_path") or "config")).stem
    return f"retrain/{config}/{datetime.now(UTC):%Y%m%d-%H%M%S}"


def promote_run_name() -> str:
    params = _parameters()
    version = params.get("version")
    return f"promote/{params.get('model_name')}/{f'v{version}' if version else 'challenger'}"


def rollback_run_name() -> str:
    return f"rollback/{_parameters().get('model_name')}"


def deploy_run_name() -> str:
    return f"deploy/{str(_parameters().get('model_uri', '')).removeprefix('models:/')}"


# --- artifacts -------------------------------------------------------------------------------------------------


def mlflow_ui_base(tracking_uri: str) -> str | None:
    """The MLflow UI for a tracking URI: the server itself, or a running `transflow ui` for the local store."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    try:
        state = json.loads(UI_STATE.read_text())
    except (OSError, ValueError):
        return None
    return str(state.get("mlflow_ui")) if state.get("mlflow_store") == tracking_uri else None


def publish_retrain(summary: dict[str, Any], experiment_id: str | None) -> None:
    """The retrain summary (stages, baselines, export, promotion) as a table; links to the MLflow run and version."""
    from prefect.artifacts import create_link_artifact, create_table_artifact

    metric = next((k for k in summary["stages"][0] if k.startswith("best_val_")), "best_val") if summary.get(
        "stages") else "best_val"  # fmt: skip
    rows = [
        {
            "model": f"stage {s['name']}" + (" (resumed)" if s.get("resumed") else ""),
            metric: round(float(s.get(metric, 0.0)), 4),
            "test accuracy": round(float(s["test"]["accuracy"]), 4),
            "test macro-F1": round(float(s["test"]["macro_f1"]), 4),
            "seconds": round(float(s.get("seconds", 0.0)), 1),
        }
        for s in summary.get("stages", [])
    ]
    rows += [
        {"model": f"baseline {name}", metric: None, "test accuracy": round(float(m["accuracy"]), 4),
         "test macro-F1": round(float(m["macro_f1"]), 4), "seconds": None}
        for name, m in (summary.get("baselines") or {}).items()
    ]  # fmt: skip
    model = summary.get("model_name") or "model"
    version = summary.get("model_version")
    check = summary.get("baseline_check") or {}
    what = f"{model} v{version} (challenger)" if version else f"run {summary.get('run_id')} (not registered)"
    description = (
        f"**{what}**, data `{str(summary.get('data_version'))[:12]}`, {summary.get('seconds', 0):.0f}s. "
        + (f"Baselines: {'beaten' if check.get('passed') else 'NOT beaten'} ({check.get('detail')}). " if check else "")
        + (f"Auto-promotion: {summary['promotion']['outcome']}." if summary.get("promotion") else "")
    )
    _safely(create_table_artifact, table=rows, key=artifact_key("retrain", model), description=description)
    base = mlflow_ui_base(str(summary.get("tracking_uri", "")))
    run_id = summary.get("run_id")
    run_link = f"{base}/#/experiments/{experiment_id}/runs/{run_id}" if base and experiment_id else None
    link = run_link or f"{summary.get('tracking_uri')} run {run_id}"
    _safely(create_link_artifact, link=link, link_text=f"MLflow run {run_id}", key=artifact_key("mlflow-run", model),
            description=f"MLflow run of this retrain ({summary.get('tracking_uri')})")  # fmt: skip
    if version:
        version_link = f"{base}/#/models/{quote(model)}/versions/{version}" if base else f"models:/{model}/{version}"
        _safely(create_link_artifact, link=version_link, link_text=f"{model} v{version}",
                key=artifact_key("mlflow-version", model),
                description=f"registered version `models:/{model}/{version}` (alias challenger)")  # fmt: skip


def decision_markdown(d: dict[str, Any]) -> str:
    verdict = str(d["outcome"]).replace("_", " ").upper()
    lines = [
        f"# {d['model']}: {verdict}" + (" (dry run: nothing changed)" if d.get("dry_run") else ""),
        "",
        f"{d['action']} of v{d.get('challenger') or '-'}: champion v{d.get('champion_before') or '-'} → "
        f"v{d.get('champion_after') or '-'}, by {d.get('user')} at {d.get('time')}",
        "",
    ]
    theirs = d.get("champion_metrics") or {}
    if d.get("challenger_metrics"):
        lines += ["| metric | challenger | champion |", "| --- | --- | --- |"]
        lines += [
            f"| {k} | {v:.4f} | {theirs[k]:.4f} |" if k in theirs else f"| {k} | {v:.4f} | - |"
            for k, v in d["challenger_metrics"].items()
        ]
        lines.append("")
    lines += [f"- {'✓' if c.get('ok') else '✗'} **{c.get('name')}**: {c.get('detail')}" for c in d.get("checks", [])]
    lines += ["", "Why: " + "; ".join(d.get("reasons", []))]
    return "\n".join(lines)


def publish_decision(decision: dict[str, Any]) -> None:
    from prefect.artifacts import create_markdown_artifact

    _safely(create_markdown_artifact, markdown=decision_markdown(decision),
            key=artifact_key("promotion", decision["model"]),
            description=f"{decision['action']} of {decision['model']}: {decision['outcome']}")  # fmt: skip


def deploy_markdown(outcome: dict[str, Any]) -> str:
    lines = [
        f"# {outcome['model']} v{outcome['version']}: {outcome.get('status', 'deployed')}",
        "",
        f"bundle `{outcome.get('bundle_sha256', '')[:12]}` at {outcome.get('time')}",
        "",
        "| target | status | golden checked |",
        "| --- | --- | --- |",
    ]
    for row in outcome.get("results") or []:
        lines.append(f"| {row['target']} | {row['status']} | {(row.get('golden') or {}).get('checked', '-')} |")
    if outcome.get("error"):
        lines += ["", "```", str(outcome["error"]), "```"]
    return "\n".join(lines)


def publish_deploy(outcome: dict[str, Any]) -> None:
    from prefect.artifacts import create_markdown_artifact

    _safely(create_markdown_artifact, markdown=deploy_markdown(outcome), key=artifact_key("deploy", outcome["model"]),
            description=f"deploy of {outcome['model']} v{outcome['version']}: {outcome.get('status')}")  # fmt: skip


def _safely(create: Any, **kwargs: Any) -> None:
    try:
        create(**kwargs)
    except Exception as exc:  # a view of the record must never fail the flow that made the record
        log.warning("could not publish Prefect artifact %s: %s", kwargs.get("key"), exc)
