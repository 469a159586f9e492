"""`transflow deploy MODEL@ALIAS --target URL …`: the deploy flow from the command line.

Only typer and rich at import time; the flow (prefect, mlflow, httpx) is imported inside the command.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

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
) -> None:
    """Push a registered version's bundle to edge servers, check its golden outputs, roll all back on failure."""
    targets, token_env, tracking_uri = _with_config(config, list(targets), token_env, tracking_uri)
    from flows.deploy import DeployError, deploy

    try:
        outcome = deploy(model, targets, token_env, tracking_uri, wait)
    except DeployError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(1) from None
    table = Table(
        "target", "status", "golden checked", "max |Δscore|", title=f"{outcome['model']} v{outcome['version']}"
    )
    for row in outcome["results"]:
        golden = row["golden"]
        diff = f"{golden['max_score_diff']:.1e}" if "max_score_diff" in golden else "-"
        table.add_row(row["target"], row["status"], str(golden["checked"] or "-"), diff)
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
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(1) from None
    return (
        [*targets, *cfg.deploy.targets],
        token_env or cfg.deploy.token_env,
        tracking_uri or cfg.registry.tracking_uri,
    )
