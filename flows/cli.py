"""`transflow`: the command line. Parses arguments, builds the RunConfig, calls flows; nothing more.

Heavy libraries (torch, mlflow, prefect) are imported inside commands so `--help` stays instant.
Exit codes (every command): 0 ok, 1 refused or a failed check, 2 bad input; errors are one line on stderr
(`flows/cli_errors.py`). `--json` prints the result for scripts on stdout, everything else goes to stderr.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from flows.cli_deploy import deploy_cmd
from flows.cli_distill import distill_cmd
from flows.cli_drift import watch_drift_cmd
from flows.cli_edge import edge_app
from flows.cli_errors import EXIT_BAD_INPUT, fail, run_cli
from flows.cli_registry import lineage_cmd, promote_cmd, rollback_cmd
from flows.cli_report import report_cmd
from flows.cli_schedule import schedule_app
from flows.cli_ui import ui_cmd, use_local_ui
from flows.prefect_env import apply_prefect_defaults
from flows.temp_server import enable as enable_temporary_server
from flows.temp_server import ensure_prefect_api
from runconfig import ConfigError, DataConfig, load_config, load_pretrain_config

console = Console()
app = typer.Typer(
    help="Transfer learning with Transformers, from DVC-versioned data to ONNX models on edge servers.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
data_app = typer.Typer(help="Prepare, verify and inspect the DVC-versioned datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(edge_app, name="edge")
app.command("deploy")(deploy_cmd)
app.command("promote")(promote_cmd)
app.command("rollback")(rollback_cmd)
app.command("lineage")(lineage_cmd)
app.command("report")(report_cmd)
app.command("distill")(distill_cmd)
app.add_typer(schedule_app, name="schedule")
app.command("ui")(ui_cmd)
app.command("watch-drift")(watch_drift_cmd)

CONFIG_OPT = typer.Option(..., "--config", "-c", help="YAML run config (see configs/).")
SET_OPT = typer.Option([], "--set", help="Override a config value: --set training.seed=7 (repeatable).")
JSON_OPT = typer.Option(False, "--json", help="Print the result as JSON on stdout (progress goes to stderr).")


def _version(show: bool) -> None:
    if show:
        from importlib.metadata import version

        typer.echo(f"transflow {version('transflow')} (transflow-edge {version('transflow-edge')})")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print versions, exit."),
) -> None:
    """Transfer learning with Transformers, from DVC-versioned data to ONNX models on edge servers.

    Exit codes: 0 ok, 1 refused or a failed check, 2 bad input (a missing file, key, model or version)."""


def as_json(call: Callable[[], Any]) -> Any:
    """Run `call` with stdout sent to stderr (flow logs, progress, tables), so stdout carries only the JSON."""
    with contextlib.redirect_stdout(sys.stderr):
        result = call()
    typer.echo(json.dumps(result, indent=2, default=str))
    return result


@data_app.command("prepare")
def data_prepare(
    out: Path = typer.Option(Path("data"), help="Where to write the datasets (tracked by DVC as one directory)."),
    dvc: bool = typer.Option(True, help="Track the result with DVC (`dvc add`, then push to the default remote)."),
) -> None:
    """Build the demo datasets (tweets, fashion-mnist, digits) deterministically and pin them with DVC."""
    from tasks.data import DataError, dvc_track
    from tasks.demo_datasets import SourceMissingError, prepare_all

    started = time.perf_counter()
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with console.status("building datasets from the offline sources…"):
            sizes = prepare_all(staging)
    except SourceMissingError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        fail(exc, EXIT_BAD_INPUT)
    _replace_dir(staging, out)
    table = Table("dataset", "train", "validation", "test", title=f"prepared into {out}/")
    for name, split_sizes in sizes.items():
        table.add_row(name, *(str(split_sizes[s]) for s in ("train", "validation", "test")))
    console.print(table)
    if dvc:
        try:
            with console.status("dvc add…"):
                pin = dvc_track(out, Path.cwd())
        except DataError as exc:
            fail(str(exc))
        console.print(f"data version (md5 in {pin.dvc_file.name}): [bold]{pin.version}[/]")
    console.print(f"done in {time.perf_counter() - started:.1f}s")


def _replace_dir(new: Path, target: Path) -> None:
    """Swap `new` into `target` so a crash mid-prepare never leaves a half-written data directory."""
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


@data_app.command("verify")
def data_verify(
    dvc_file: Path = typer.Option(Path("data.dvc"), help="The DVC file that pins the data."),
    json_out: bool = JSON_OPT,
) -> None:
    """Re-hash the data against its DVC pin; fail naming every changed, missing or extra file.

    Exit code 1 when the data does not match, 2 when the DVC file is missing or unreadable."""
    from tasks.data import verify_data

    report = verify_data(dvc_file)  # DataNotFound (exit 2) when there is no pin to check against
    if json_out:
        typer.echo(json.dumps({"dvc_file": str(dvc_file), "ok": report.ok, "version": report.version,
                               "actual": report.actual, "problems": report.problems}, indent=2))  # fmt: skip
        raise typer.Exit(0 if report.ok else 1)
    if not report.ok:
        for problem in report.problems:
            console.print(f"[red]✗[/] {problem}")
        fail(f"data does not match {dvc_file} (pinned {report.version}, found {report.actual})")
    console.print(f"[green]✓[/] data matches {dvc_file}: version {report.version}")


@data_app.command("status")
def data_status(
    dvc_file: Path = typer.Option(Path("data.dvc"), help="The DVC file that pins the data."),
    config: Path | None = typer.Option(None, "--config", "-c", help="Show this run config's data instead."),
    overrides: list[str] = SET_OPT,
) -> None:
    """Print the data version (md5), and split sizes and class balance per dataset."""
    from tasks.data import DataError, class_balance, data_version, load_dataset, read_pin

    try:
        if config:
            cfg = load_config(config, overrides).data
            targets = [cfg]
            console.print(f"data version: [bold]{data_version(cfg.dvc_file)}[/]")
        else:
            pin = read_pin(dvc_file)
            console.print(f"data version (md5 in {dvc_file}): [bold]{pin.version}[/]  files: {pin.nfiles}")
            targets = [_guess_data_config(d) for d in sorted(pin.path.iterdir()) if d.is_dir()]
        for cfg in targets:
            _print_balance(cfg.path, class_balance(load_dataset(cfg)))
    except (DataError, ConfigError, ValueError) as exc:
        fail(exc, EXIT_BAD_INPUT)


def _guess_data_config(path: Path) -> DataConfig:
    text = any(path.glob("*.jsonl")) or any(path.glob("*.csv"))
    return DataConfig(modality="text" if text else "image", path=path, dvc_file=None)


def _print_balance(path: Path, balance: dict[str, dict[str, int]]) -> None:
    """One row per class, one column per split: stays readable with many classes."""
    classes = sorted({c for counts in balance.values() for c in counts})
    table = Table("class", *balance, title=str(path))
    for c in classes:
        table.add_row(c, *(str(counts.get(c, 0)) for counts in balance.values()))
    table.add_row("[bold]total[/]", *(f"[bold]{sum(counts.values())}[/]" for counts in balance.values()))
    console.print(table)


@app.command("retrain")
def retrain_cmd(
    config: Path = CONFIG_OPT,
    overrides: list[str] = SET_OPT,
    summary: Path | None = typer.Option(None, help="Where to write run-summary.json (default: in the run dir)."),
    fresh: bool = typer.Option(False, help="Retrain every stage instead of resuming finished ones."),
    train_on: str | None = typer.Option(
        None, help="Run the training as this Prefect deployment (e.g. train/train-gpu; needs PREFECT_API_URL)."
    ),
    json_out: bool = JSON_OPT,
) -> None:
    """The main job, the retraining flow: verify data, load the backbone, fine-tune stage by stage, evaluate
    against the baselines, register, export (and promote if configured). `transflow run` is an alias.

    Exit code 1 when the data does not match its pin or the export fails parity; 2 for a bad config."""
    cfg = load_config(config, overrides)  # ConfigError: exit 2, before Prefect or torch load
    if cfg.data.dvc_file is not None and not train_on:
        from tasks.data import ensure_data

        # Checked here too (the flow checks again), so wrong data is one line before any flow run starts:
        # DataNotFound exits 2, a mismatch 1. Missing data is pulled from the DVC remote first.
        report = ensure_data(cfg.data.dvc_file)
        if not report.ok:
            fail(f"data does not match {cfg.data.dvc_file}: {'; '.join(report.problems[:5])}")
    ensure_prefect_api()  # the guarded temporary server, if no Prefect API is configured
    from flows.retrain import retrain

    def call() -> dict[str, Any]:
        return retrain(str(config), list(overrides), str(summary) if summary else None, fresh, train_on)

    if json_out:
        as_json(call)
    else:
        call()


app.command("run", hidden=True)(retrain_cmd)  # the name of earlier releases, kept for scripts


@app.command("pretrain")
def pretrain(config: Path = CONFIG_OPT, overrides: list[str] = SET_OPT) -> None:
    """Pretrain a backbone (MIM or supervised for ViT, MLM for text) and register it as NAME@latest."""
    load_pretrain_config(config, overrides)  # ConfigError: exit 2
    ensure_prefect_api()  # the guarded temporary server, if no Prefect API is configured
    from flows.pretrain import pretrain_flow

    pretrain_flow(str(config), list(overrides))


experiment_app = typer.Typer(help="Reproducible experiments.", no_args_is_help=True)
app.add_typer(experiment_app, name="experiment")


@experiment_app.command("transfer")
def experiment_transfer(
    config: Path = typer.Option(Path("configs/vision-digits.yaml"), "--config", "-c", help="Base run config."),
    overrides: list[str] = SET_OPT,
    target: list[str] = typer.Option([], help="digits, fashion-1pct, fashion-10pct (default: all)."),
    init: list[str] = typer.Option([], help="scratch, mim, supervised (default: all)."),
    pretrain: bool = typer.Option(True, help="Pretrain the backbones first (else reuse the registered @latest)."),
    out: Path = typer.Option(Path("runs/experiments/transfer"), help="Where the table goes."),
) -> None:
    """Pretrained vs from-scratch ViT on low-resource targets, staged vs single full fine-tune: one table."""
    ensure_prefect_api()  # the guarded temporary server, if no Prefect API is configured
    from flows.experiment import transfer_experiment

    transfer_experiment(str(config), target or None, init or None, list(overrides), str(out), pretrain)


@app.command("export")
def export(
    model: str = typer.Argument(..., help="Registered version: NAME@ALIAS, NAME/VERSION or models:/…"),
    out: Path = typer.Option(..., "--out", "-o", help="Directory for the bundle (dir + .tar.gz)."),
    tracking_uri: str | None = typer.Option(None, help="MLflow tracking URI (default: env or local store)."),
    json_out: bool = JSON_OPT,
) -> None:
    """Export a registered model to ONNX (parity-checked, optimised, int8) and write its verified bundle.

    Exit code 1 when the export fails its parity check, 2 for an unknown model, version or alias."""
    ensure_prefect_api()  # the guarded temporary server, if no Prefect API is configured
    from flows.export import export_model

    if json_out:
        as_json(lambda: export_model(model, str(out), tracking_uri))
        return
    report = export_model(model, str(out), tracking_uri)
    console.print(
        f"[green]✓[/] bundle {report['bundle_dir']} + {report['bundle_tar']}\n"
        f"  sha256 {report['bundle_sha256']} · default {report['default_model']} · "
        f"fp32 max |Δlogit| {report['fp32_max_abs_diff']:.1e} · {report['int8_reason']}"
    )


def main() -> None:
    apply_prefect_defaults()
    use_local_ui()  # a running `transflow ui` server: every command reports to it (no temporary server)
    enable_temporary_server()  # flow commands: Prefect's temporary server, guarded (flows/temp_server.py)
    sys.exit(run_cli(app))


if __name__ == "__main__":
    main()
