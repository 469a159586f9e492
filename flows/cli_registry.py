"""`transflow promote | rollback | lineage`: the model registry lifecycle on the command line.

Plain Typer command functions, registered in `flows/cli.py`. Heavy libraries (torch, mlflow, prefect) load
inside the commands, so `transflow --help` and bad arguments answer at once.
Exit codes: 0 promoted (or rolled back), 1 refused by the gate, 2 bad input or the registry failed
(`flows/cli_errors.py`); errors are one line on stderr.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

from flows.cli_errors import EXIT_BAD_INPUT, fail
from flows.temp_server import ensure_prefect_api

console = Console()
T = TypeVar("T")

TRACKING_OPT = typer.Option(
    None, "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the local store)."
)
JSON_OPT = typer.Option(False, "--json", help="Print the result as JSON instead of a table.")


def _guarded(call: Callable[[], T]) -> T:
    """Bad input and registry failures become one red line and exit code 2, not a traceback."""
    from tasks.registered_version import RegistryError  # inside: loads torch and mlflow (seconds)
    from tasks.tracking import tracking_errors

    try:
        return call()
    except RegistryError as exc:
        fail(exc, EXIT_BAD_INPUT)
    except tracking_errors() as exc:
        fail(f"registry error: {type(exc).__name__}: {exc}", EXIT_BAD_INPUT)


def promote_cmd(
    model: str = typer.Argument(..., help="Registered model name, e.g. tweets-sentiment."),
    version: str | None = typer.Option(None, "--version", help="Version to judge (default: alias 'challenger')."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Evaluate and decide, but change and log nothing."),
    history: bool = typer.Option(False, "--history", help="Print the promotion log (JSON lines, oldest first)."),
    recover: bool = typer.Option(
        False, "--recover", help="Complete the model's half-done promotions/rollbacks (after a crash); judge nothing."
    ),
    prepare: bool = typer.Option(
        False, "--prepare", help="Create the promotion lock and log experiment (an admin, before granting users)."
    ),
    metric: str | None = typer.Option(None, help="macro_f1 or accuracy (default: the run's evaluation.metric)."),
    margin: float | None = typer.Option(None, help="Required win over the champion (default: registry.margin)."),
    int8_budget_pt: float | None = typer.Option(None, help="Max int8 drop in points (default: the run's budget)."),
    device: str = typer.Option("cpu", help="Where to re-evaluate both models: cpu, cuda or auto."),
    tracking_uri: str | None = TRACKING_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Promotion gate: move alias 'champion' to the challenger only if it beats the champion.

    Both are re-evaluated on the same test split of the same data version.
    Also required: ONNX parity, int8 within budget (or fp32 shipped),
    a bundle that verifies, and the champion's label set.
    Every decision is logged: version tags + a run in `<model>-promotions`.
    Exit code: 0 promoted, 1 refused, 2 bad input or registry error."""
    if history:
        _print_history(model, tracking_uri)
        return
    if recover or prepare:
        _recover_or_prepare(model, tracking_uri, prepare)
        return
    ensure_prefect_api()  # the guarded temporary server, if no Prefect API is configured
    from flows.promote import promote

    decision: dict[str, Any] = _guarded(
        lambda: promote(model, version, dry_run, tracking_uri, metric, margin, int8_budget_pt, device)
    )
    if as_json:
        typer.echo(json.dumps(decision, indent=2))
    else:
        _print_decision(decision)
    raise typer.Exit(0 if decision["outcome"] == "promoted" else 1)


def rollback_cmd(
    model: str = typer.Argument(..., help="Registered model name."),
    reason: str = typer.Option("", "--reason", help="Why: kept in the promotion log."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would happen; change and log nothing."),
    tracking_uri: str | None = TRACKING_OPT,
) -> None:
    """Move alias 'champion' back to the version it replaced.

    Logged like a promotion (who, when, from, to, why).
    Repeat to walk further back."""
    ensure_prefect_api()  # the guarded temporary server, if no Prefect API is configured
    from flows.promote import rollback

    decision: dict[str, Any] = _guarded(lambda: rollback(model, reason, dry_run, tracking_uri))
    prefix = "[yellow]dry run:[/] would be " if dry_run else "[green]✓[/] "
    console.print(f"{prefix}{escape(decision['reasons'][0])} (by {escape(decision['user'])} at {decision['time']})")


def lineage_cmd(
    target: str | None = typer.Argument(None, help="NAME@ALIAS or NAME/VERSION, e.g. tweets-sentiment@champion."),
    bundle: Path | None = typer.Option(None, "--bundle", help="An edge bundle directory or .tar.gz instead."),
    tracking_uri: str | None = TRACKING_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Print the lineage chain: bundle sha256 → model version → run → data version → git commit → backbone.

    The data version is the DVC md5 of the training data.
    A backbone from the registry (models:/…) gets its own chain.
    --bundle verifies the bundle, then checks it against the registry:
    exit 1 when the registry recorded another bundle for that version."""
    from tasks.lineage import bundle_lineage, version_lineage
    from tasks.tracking import Tracker, resolve_tracking_uri

    if (target is None) == (bundle is None):
        fail("lineage: give either MODEL@ALIAS or --bundle DIR", EXIT_BAD_INPUT)
    tracker = Tracker(resolve_tracking_uri(tracking_uri))
    if bundle is not None:
        chain = _guarded(lambda: bundle_lineage(bundle, tracker))
    else:
        chain = _guarded(lambda: version_lineage(tracker, target or ""))
    if as_json:
        typer.echo(json.dumps(chain, indent=2))
        return
    console.print(_lineage_tree(chain))
    if (chain.get("registry") or {}).get("agrees") is False:  # the registry recorded another bundle
        fail(f"bundle {chain.get('bundle_sha256')} is not the bundle the registry recorded for "
             f"{chain.get('model')} v{chain.get('version')}")  # fmt: skip


def _recover_or_prepare(model: str, tracking_uri: str | None, prepare: bool) -> None:
    if prepare:
        from tasks.registered_version import require_model
        from tasks.registry_lock import LOG_SUFFIX
        from tasks.registry_lock import prepare as prepare_lock
        from tasks.tracking import Tracker, resolve_tracking_uri

        tracker = Tracker(resolve_tracking_uri(tracking_uri))
        lock, _, _ = _guarded(lambda: (require_model(tracker, model), prepare_lock(tracker, model))[1])
        names = f"promotion lock [bold]{escape(lock)}[/], log experiment [bold]{escape(model + LOG_SUFFIX)}[/]"
        console.print(
            f"{names} ready: grant promoters MANAGE on both models, EDIT on the experiment (mlflow/README.md)"
        )
        return
    ensure_prefect_api()  # the guarded temporary server, if no Prefect API is configured
    from flows.promote import recover

    done: list[dict[str, Any]] = _guarded(lambda: recover(model, tracking_uri))
    for d in done:
        move = f"champion v{d['champion_before'] or '-'} → v{d['champion_after'] or '-'} ({d['outcome']})"
        console.print(f"[green]✓[/] completed {d['action']} by {escape(d['user'])} at {d['time']}: {move}")
    if not done:
        console.print(f"{escape(model)}: nothing half-done")


def _print_history(model: str, tracking_uri: str | None) -> None:
    from tasks.promote import history
    from tasks.tracking import Tracker, resolve_tracking_uri

    entries = _guarded(lambda: history(Tracker(resolve_tracking_uri(tracking_uri)), model))
    for entry in entries:
        typer.echo(json.dumps(entry, separators=(",", ":")))


def _print_decision(d: dict[str, Any]) -> None:
    metrics = Table("metric", f"challenger v{d['challenger']}", f"champion v{d['champion_before'] or '-'}")
    theirs = d["champion_metrics"] or {}
    for key, value in d["challenger_metrics"].items():
        metrics.add_row(key, f"{value:.4f}", f"{theirs[key]:.4f}" if key in theirs else "-")
    console.print(metrics)
    for check in d["checks"]:
        mark = "[green]✓[/]" if check["ok"] else "[red]✗[/]"
        console.print(f"  {mark} {check['name']}: {escape(check['detail'])}")
    verdict = "[bold green]PROMOTED[/]" if d["outcome"] == "promoted" else "[bold red]REFUSED[/]"
    dry = " [yellow](dry run: nothing changed)[/]" if d["dry_run"] else ""
    console.print(
        f"{verdict} {escape(d['model'])} v{d['challenger']}: champion v{d['champion_before'] or '-'} → "
        f"v{d['champion_after'] or '-'} · test split of data {str(d['data_version'])[:12]} "
        f"({d['test_size']} examples) · by {escape(d['user'])} at {d['time']}{dry}"
    )


def _lineage_tree(chain: dict[str, Any]) -> Tree:
    registry = chain.get("registry") or {}
    note = ""
    if chain.get("bundle_verified"):
        agrees = registry.get("agrees")
        note = " (verified" + {True: "; registry agrees)", False: "; [red]registry has another bundle[/])"}.get(
            agrees, f"; registry: {escape(str(registry.get('error', 'not found')))})"
        )
    root = Tree(f"bundle sha256 [bold]{chain.get('bundle_sha256') or '-'}[/]{note}")
    _chain_nodes(root, chain)
    return root


def _chain_nodes(parent: Tree, chain: dict[str, Any]) -> None:
    def value(key: str) -> str:
        return escape(str(chain.get(key) or "-"))

    aliases = escape(f" [{', '.join(chain['aliases'])}]") if chain.get("aliases") else ""
    node = parent.add(f"model [bold]{value('model')}[/] v{value('version')}{aliases}")
    node = node.add(f"run {value('run_id')}")
    node = node.add(f"data version (DVC md5) {value('data_version')}")
    dirty = " [yellow](dirty)[/]" if chain.get("git_dirty") == "true" else ""
    node = node.add(f"git commit {value('git_commit')}{dirty}")
    node = node.add(f"backbone {value('backbone')}")
    sub = chain.get("backbone_lineage")
    if sub and "error" in sub:
        node.add(f"[red]{escape(sub['error'])}[/]")
    elif sub:
        when = " (alias resolved now: the run did not record which version)" if sub.get("resolved_now") else ""
        inner = node.add(f"backbone lineage{when}: bundle sha256 {escape(str(sub.get('bundle_sha256') or '-'))}")
        _chain_nodes(inner, sub)
