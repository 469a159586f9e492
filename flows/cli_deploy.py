"""`transflow deploy MODEL@ALIAS --target URL …`: the deploy flow from the command line.

Only typer and rich at import time; the flow (prefect, mlflow, httpx) is imported inside the command.
Exit codes: 0 deployed, 1 the deploy failed (every target rolled back), 2 bad input (config, model, targets).
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from flows.cli_errors import EXIT_BAD_INPUT, fail
from flows.temp_server import ensure_prefect_api

console = Console()


def deploy_cmd(
    model: str = typer.Argument(..., help="Registered version: NAME@ALIAS, NAME/VERSION or models:/…"),
    targets: list[str] = typer.Option(
        [], "--target", "-t", help="Edge server http(s)://host:port, or dir:///watched/folder (repeatable)."
    ),
    config: Path | None = typer.Option(
        None, "--config", "-c", help="Run config: adds its deploy.targets, and its token_env and tracking URI."
    ),
    token_env: str | None = typer.Option(
        None, "--token-env", help="Environment variable holding the admin token (default TRANSFLOW_EDGE_TOKEN)."
    ),
    tracking_uri: str | None = typer.Option(None, help="MLflow tracking URI (default: env or local store)."),
    wait: float = typer.Option(60.0, help="Seconds to wait for each server to report the new bundle."),
    json_out: bool = typer.Option(False, "--json", help="Print the outcome as JSON on stdout."),
    strategy: str = typer.Option(
        "direct", help="direct (push to all), or shadow / canary: a candidate per wave, watched, judged, promoted."
    ),
    waves: str = typer.Option("1,rest", help="Wave sizes in target order: counts, shares (25%) and 'rest'."),
    window_s: float = typer.Option(60.0, help="Seconds each wave's candidate is watched before it is judged."),
    min_samples: int = typer.Option(20, help="Inputs both models must have answered on a target to judge it."),
    min_agreement: float = typer.Option(0.9, help="Least top-1 agreement of candidate and live model."),
    max_error_rate: float = typer.Option(0.01, help="Largest share of candidate calls that may fail."),
    max_p95_ratio: float = typer.Option(2.0, help="Largest candidate p95 latency ÷ live p95 (like for like)."),
    fraction: float = typer.Option(0.1, help="canary: share of requests the candidate answers."),
    sticky: str | None = typer.Option(None, help="canary: request header whose value keeps a client on one model."),
) -> None:
    """Push a registered version's bundle to edge servers, check its golden outputs, roll all back on failure;
    with --strategy shadow|canary, in waves of candidates judged on live traffic (dropped everywhere on a fail)."""
    targets, token_env, tracking_uri = _with_config(config, list(targets), token_env, tracking_uri)
    if not targets:
        fail("deploy: no targets: give --target URL (repeatable) or deploy.targets in the run config", EXIT_BAD_INPUT)
    ensure_prefect_api()  # the guarded temporary server, if no Prefect API is configured
    from flows.deploy import deploy

    rules = dict(window_s=window_s, min_samples=min_samples, min_agreement=min_agreement, max_error_rate=max_error_rate,
                 max_p95_ratio=max_p95_ratio, fraction=fraction, sticky=sticky)  # fmt: skip
    args = (model, targets, token_env, tracking_uri, wait, strategy, waves, None if strategy == "direct" else rules)
    if json_out:  # the flow's logs go to stderr; stdout carries only the outcome
        import contextlib
        import json
        import sys

        with contextlib.redirect_stdout(sys.stderr):
            outcome = deploy(*args)
        typer.echo(json.dumps(outcome, indent=2, default=str))
        return
    outcome = deploy(*args)  # DeployError: one line, exit 1
    if outcome.get("steps"):
        _print_waves(outcome)
        return
    table = Table(
        "target", "status", "golden checked", "max |Δscore|", title=f"{outcome['model']} v{outcome['version']}"
    )
    for row in outcome["results"]:
        golden = row["golden"]
        diff = f"{golden['max_score_diff']:.1e}" if "max_score_diff" in golden else "-"
        table.add_row(row["target"], row["status"], str(golden["checked"] or "-"), diff)
    console.print(table)
    console.print(f"[green]✓[/] serving bundle {outcome['bundle_sha256'][:12]} on {len(outcome['results'])} target(s)")


def _print_waves(outcome: dict) -> None:
    title = f"{outcome['model']} v{outcome['version']}: {outcome['strategy']} rollout"
    table = Table("target", "wave", "step", "verdict", "agreement", "error rate", "p95 ratio", "compared", title=title)
    for s in outcome["steps"]:
        f = s.get("figures") or {}
        cells = [f.get(k) for k in ("agreement", "error_rate", "p95_ratio")]
        table.add_row(s["target"], str(s["wave"]), s["step"], s.get("verdict", ""),
                      *("-" if c is None else f"{c:.3f}" for c in cells), str(f.get("compared", "")))  # fmt: skip
    console.print(table)
    console.print(f"[green]✓[/] serving bundle {outcome['bundle_sha256'][:12]} on {len(outcome['results'])} target(s)")


def _with_config(
    config: Path | None, targets: list[str], token_env: str | None, tracking_uri: str | None
) -> tuple[list[str], str, str | None]:
    """Flags win over the run config; the config's targets are added after the flags' ones."""
    if config is None:
        return targets, token_env or "TRANSFLOW_EDGE_TOKEN", tracking_uri
    from runconfig import ConfigError, load_config

    try:
        cfg = load_config(config)
    except ConfigError as exc:
        fail(exc, EXIT_BAD_INPUT)
    return (
        [*targets, *cfg.deploy.targets],
        token_env or cfg.deploy.token_env,
        tracking_uri or cfg.registry.tracking_uri,
    )
