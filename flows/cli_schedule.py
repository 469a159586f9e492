"""`transflow schedule …`: install, list and pause the Prefect deployments of prefect.yaml.

Wraps what users would otherwise type: `prefect work-pool create --base-job-template`, `prefect deploy --all`,
`prefect deployment schedule pause`. Talks to the server in PREFECT_API_URL; prefect is imported inside the
commands so `transflow --help` stays instant.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from flows.cli_errors import EXIT_BAD_INPUT, EXIT_REFUSED, fail

ROOT = Path(__file__).resolve().parents[1]
POOL_TYPE = "process"
POOL_DESCRIPTIONS = {
    "cpu": "Transflow CPU workers: retrain, watch-data (GPUs hidden from flow runs).",
    "gpu": "Transflow GPU workers: train-gpu, the stages of retrain-gpu (one worker per GPU).",
}

console = Console()
schedule_app = typer.Typer(
    help="Install, list and pause the scheduled Prefect deployments (prefect.yaml).", no_args_is_help=True
)


def _fail(message: str, code: int = EXIT_REFUSED) -> NoReturn:
    fail(message, code)


def api_url() -> str:
    """The server these commands talk to; an ephemeral in-process server would forget everything at exit."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        _fail(
            "PREFECT_API_URL is not set: start a server (`prefect server start`), then "
            "`prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api`, or run `transflow ui` "
            "(see docs/scheduling.md)",
            EXIT_BAD_INPUT,
        )
    return str(url)


def apply_pools(pools_dir: Path) -> list[tuple[str, str]]:
    """Create or update one `process` work pool per `<name>.json` base job template; [(name, created|updated)]."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    templates = sorted(pools_dir.glob("*.json"))
    if not templates:
        _fail(f"no work pool templates (*.json) in {pools_dir}")
    done = []
    with get_client(sync_client=True) as client:
        for path in templates:
            try:
                paused, action = client.read_work_pool(path.stem).is_paused, "updated"
            except ObjectNotFound:
                paused, action = False, "created"
            pool = WorkPoolCreate(
                name=path.stem,
                type=POOL_TYPE,
                base_job_template=json.loads(path.read_text()),
                description=POOL_DESCRIPTIONS.get(path.stem),
                is_paused=paused,  # a pool someone paused stays paused
            )
            client.create_work_pool(pool, overwrite=True)
            done.append((path.stem, action))
    return done


def prefect_deploy(prefect_file: Path, names: list[str], url: str) -> subprocess.CompletedProcess[str]:
    """`prefect deploy` run in the file's directory (workers will run flows there); all deployments or `names`."""
    selection = [arg for name in names for arg in ("--name", name)] or ["--all"]
    cmd = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", *selection, "--prefect-file", prefect_file.name]
    env = os.environ | {"PREFECT_API_URL": url, "PREFECT_CLI_PROMPT": "false"}
    return subprocess.run(cmd, cwd=prefect_file.parent, env=env, capture_output=True, text=True)


@schedule_app.command("install")
def install(
    prefect_file: Path = typer.Option(ROOT / "prefect.yaml", help="The deployments to apply."),
    pools_dir: Path = typer.Option(ROOT / "deploy" / "work-pools", help="Base job templates, one <pool>.json each."),
    names: list[str] = typer.Option([], "--name", "-n", help="Deploy only these deployments (default: all)."),
) -> None:
    """Create/update the work pools from their templates, then `prefect deploy` every deployment in prefect.yaml."""
    url = api_url()
    if not prefect_file.is_file():
        _fail(f"{prefect_file} not found")
    for name, action in apply_pools(pools_dir):
        console.print(f"[green]✓[/] work pool [bold]{name}[/] ({POOL_TYPE}) {action} from {pools_dir / name}.json")
    with console.status(f"prefect deploy {' '.join(names) or '--all'} → {url} …"):
        proc = prefect_deploy(prefect_file.resolve(), names, url)
    if proc.returncode != 0:
        console.print(proc.stdout + proc.stderr, markup=False, highlight=False)
        _fail(f"`prefect deploy` failed (exit {proc.returncode})")
    for name in re.findall(r"Deployment '([^']+)' successfully created", proc.stdout):
        console.print(f"[green]✓[/] deployment [bold]{name}[/] applied from {prefect_file.name}")
    console.print("next: `transflow schedule list`; start workers with `prefect worker start --pool cpu` (and gpu)")


def describe(schedule: Any) -> str:
    """'cron 30 3 * * 1 (UTC)', 'every 0:15:00 (UTC)' or 'rrule …': what a schedule says, with its zone."""
    zone = getattr(schedule, "timezone", None) or "UTC"
    if getattr(schedule, "cron", None):
        return f"cron {schedule.cron} ({zone})"
    if isinstance(getattr(schedule, "interval", None), timedelta):
        return f"every {schedule.interval} ({zone})"
    return f"rrule {getattr(schedule, 'rrule', schedule)} ({zone})"


def next_times(schedule: Any, count: int) -> list[str]:
    """The next `count` times the schedule fires, computed by Prefect's own scheduler code (local to its zone)."""
    import asyncio

    from prefect.server.schemas.schedules import SCHEDULE_TYPES
    from pydantic import TypeAdapter

    server_side = TypeAdapter(SCHEDULE_TYPES).validate_python(schedule.model_dump())
    return [d.strftime("%Y-%m-%d %H:%M %Z") for d in asyncio.run(server_side.get_dates(n=count))]


def deployment_rows(count: int) -> list[dict[str, Any]]:
    """One row per (deployment, schedule), deployments without a schedule included once."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        flows = {f.id: f.name for f in client.read_flows()}
        deployments = client.read_deployments()
    rows = []
    for d in sorted(deployments, key=lambda d: (flows.get(d.flow_id, ""), d.name)):
        base = {"deployment": f"{flows.get(d.flow_id, '?')}/{d.name}", "pool": d.work_pool_name or "-"}
        for s in d.schedules or [None]:
            live = s is not None and s.active and not d.paused
            rows.append(
                base
                | {
                    "schedule": describe(s.schedule) if s else "-",
                    "state": "-" if s is None else ("active" if live else "paused"),
                    "next": next_times(s.schedule, count) if live else [],
                }
            )
    return rows


@schedule_app.command("list")
def list_schedules(
    upcoming: int = typer.Option(3, min=1, max=20, help="How many upcoming times to show per schedule."),
    json_out: bool = typer.Option(False, "--json", help="Print the rows as JSON (an empty list when none)."),
) -> None:
    """Deployments with their work pool, schedules (and time zones), paused or active, and next run times."""
    api_url()
    rows = deployment_rows(upcoming)
    if json_out:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        _fail("no deployments on this server: run `transflow schedule install` first")
    table = Table("deployment", "pool", "schedule", "state", "next runs", title="Prefect deployments")
    for row in rows:
        table.add_row(row["deployment"], row["pool"], row["schedule"], row["state"], "\n".join(row["next"]) or "-")
    console.print(table)


def find_deployment(client: Any, name: str) -> Any:
    """`flow/deployment` or a bare deployment name that only one flow uses."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.exceptions import ObjectNotFound

    if "/" in name:
        try:
            return client.read_deployment_by_name(name)
        except ObjectNotFound:
            _fail(f"no deployment {name!r} (see `transflow schedule list`)", EXIT_BAD_INPUT)
    found = client.read_deployments(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[name])))
    if not found:
        _fail(f"no deployment named {name!r} (see `transflow schedule list`)", EXIT_BAD_INPUT)
    if len(found) > 1:
        _fail(f"{len(found)} flows have a deployment named {name!r}: give FLOW/{name}", EXIT_BAD_INPUT)
    return found[0]


@schedule_app.command("pause")
def pause(
    name: str = typer.Argument(..., help="Deployment: NAME or FLOW/NAME, e.g. retrain or watch-data/watch-data."),
    resume: bool = typer.Option(False, "--resume", help="Turn the schedule back on instead."),
) -> None:
    """Pause a deployment's schedules (runs already queued are dropped); manual and triggered runs still work."""
    from prefect import get_client

    api_url()
    with get_client(sync_client=True) as client:
        deployment = find_deployment(client, name)
        if not deployment.schedules:
            _fail(f"deployment {name!r} has no schedule to {'resume' if resume else 'pause'}")
        for schedule in deployment.schedules:
            client.update_deployment_schedule(deployment.id, schedule.id, active=resume)
    state = "active" if resume else "paused"
    console.print(f"[green]✓[/] {name}: {len(deployment.schedules)} schedule(s) {state}")
