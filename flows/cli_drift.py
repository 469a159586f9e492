"""`transflow watch-drift --target URL …`: the watch-drift flow from the command line (one pass over the fleet).

Only typer and rich at import time; the flow (prefect, httpx) is imported inside the command.
Exit codes: 0 read and judged (drift or not: the verdict is in the table and the event), 1 no server could be
read, 2 bad input (config, no targets).
"""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from flows.cli_errors import EXIT_BAD_INPUT, fail
from flows.temp_server import ensure_prefect_api

console = Console()


def watch_drift_cmd(
    targets: list[str] = typer.Option([], "--target", "-t", help="Edge server http(s)://host:port (repeatable)."),
    config: str = typer.Option(
        "configs/text-tweets.yaml",
        "--config",
        "-c",
        help="Run config: deploy.targets when no --target, and the model and config a --retrain starts.",
    ),
    overrides: list[str] = typer.Option([], "--set", help="Override a config value (repeatable)."),
    threshold: float = typer.Option(
        0.25, help="PSI at or above which a statistic has drifted (0.1 moderate, 0.25 major)."
    ),
    min_count: int = typer.Option(200, help="Live inputs a statistic needs before it is judged."),
    cooldown_hours: float = typer.Option(24.0, help="At most one event per model version within this many hours."),
    retrain: bool = typer.Option(False, "--retrain", help="Also start the retrain deployment once per event."),
    deployment: str = typer.Option("retrain/retrain", help="The deployment --retrain starts."),
    json_out: bool = typer.Option(False, "--json", help="Print the outcome as JSON on stdout."),
) -> None:
    """Score the fleet's drift (PSI per statistic vs each bundle's test split) and emit transflow.drift.detected."""
    ensure_prefect_api()  # the guarded temporary server, if no Prefect API is configured
    from flows.watch_drift import DriftWatchError, watch_drift
    from runconfig import ConfigError, load_config

    try:  # before any flow run: a missing config or target is bad input (exit 2)
        if not targets and not load_config(config, overrides).deploy.targets:
            fail(f"watch-drift: no targets: give --target URL or deploy.targets in {config}", EXIT_BAD_INPUT)
    except ConfigError as exc:
        fail(exc, EXIT_BAD_INPUT)
    args = (targets or None, config, overrides, threshold, min_count, cooldown_hours, retrain, deployment)
    try:
        if json_out:  # the flow's logs go to stderr; stdout carries only the outcome
            import contextlib
            import json
            import sys

            with contextlib.redirect_stdout(sys.stderr):
                outcome = watch_drift(*args)
            typer.echo(json.dumps(outcome, indent=2, default=str))
        else:
            outcome = watch_drift(*args)
    except (ConfigError, DriftWatchError) as exc:
        fail(exc, EXIT_BAD_INPUT)
    if not json_out:
        table = Table("model", "version", "servers", *_stat_columns(outcome), "verdict", title="fleet drift (PSI)")
        for v in outcome["versions"]:
            scores = [
                f"{v['psi'].get(s) if v['psi'].get(s) is None else round(v['psi'][s], 3)}"
                for s in _stat_columns(outcome)
            ]
            verdict = v["action"] if not v["drifted"] else f"drift: {', '.join(v['drifted'])} ({v['action']})"
            table.add_row(v["model_name"], v["version"], str(len(v["targets"])), *scores, verdict)
        console.print(table)
        for entry in outcome["unreadable"]:
            console.print(f"[yellow]![/] {entry['target']}: {entry['error']}")
    if not outcome["versions"] and outcome["unreadable"]:
        fail("watch-drift: no edge server could be read")


def _stat_columns(outcome: dict) -> list[str]:
    names: list[str] = []
    for v in outcome["versions"]:
        names += [s for s in v["psi"] if s not in names]
    return names
