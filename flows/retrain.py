"""The retraining flow, the main job: verify data → train (staged fine-tuning) → register → export → promote.

Runs on Prefect's local (ephemeral) server with no set-up, or on a real server when PREFECT_API_URL is set.
One MLflow parent run per flow run, a nested run per stage; the run id is passed to tasks explicitly.
The heavy part (`flows/train.py`) runs inline, or with `train_deployment` as its own deployment (e.g. on the
`gpu` work pool), handed the data version and the MLflow run by reference.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from prefect import flow, task
from rich.console import Console
from rich.table import Table

from flows.prefect_artifacts import publish_retrain, retrain_run_name
from flows.promote import auto_promote
from flows.report import report_after_export
from flows.train import MODEL_ARTIFACT, TRAINING_JSON, Trained, train_model, verify_data, workdir_of
from models.adapters import load_model_dir
from runconfig import RunConfig, load_config
from tasks.data import load_dataset
from tasks.export import export_and_log
from tasks.finetune import encode_splits
from tasks.lineage import collect_lineage
from tasks.prefect_options import LIVE
from tasks.run_conventions import dataset_input, source_tags, version_description
from tasks.run_state import owned_run
from tasks.tracking import Tracker, resolve_tracking_uri

console = Console()
ENTRY_POINT = "flows/retrain.py"  # mlflow.source.name of every retraining run


class TrainDeploymentError(RuntimeError):
    """The `train` deployment's run did not complete; the message carries its state and message."""


@flow(name="retrain", log_prints=True, flow_run_name=retrain_run_name)
def retrain(
    config_path: str,
    overrides: list[str] | None = None,
    summary_path: str | None = None,
    fresh: bool = False,
    train_deployment: str | None = None,
) -> dict[str, Any]:
    """Fine-tune the configured backbone on the configured data and register a `challenger` version.

    `train_deployment` ("flow/deployment", e.g. "train/train-gpu") runs the training on that deployment's
    work pool; by default it runs here, in this process."""
    cfg = load_config(config_path, overrides or [])
    remote = {"config_path": config_path, "overrides": list(overrides or []), "deployment": train_deployment}
    return retrain_from_config(
        cfg, Path(summary_path) if summary_path else None, fresh, remote if train_deployment else None
    )


def retrain_from_config(
    cfg: RunConfig, summary_path: Path | None = None, fresh: bool = False, remote: dict[str, Any] | None = None
) -> dict[str, Any]:
    started = time.perf_counter()
    if remote:  # before anything is opened: a wrong name fails in a second, not after the data check
        check_deployment(remote["deployment"])
    version = verify_data(cfg.data.dvc_file)
    tracker = Tracker(resolve_tracking_uri(cfg.registry.tracking_uri))
    workdir = workdir_of(cfg, version)
    lineage = collect_lineage(cfg.data.dvc_file, cfg.config_hash()) | {"backbone": cfg.backbone.uri}
    if cfg.backbone.uri.startswith("models:/"):  # pin what the alias meant at training time
        lineage["backbone_version"] = "/".join(tracker.resolve_version(cfg.backbone.uri))
    workdir.mkdir(parents=True, exist_ok=True)
    tags = lineage | source_tags(lineage, ENTRY_POINT)
    # Ends the run FINISHED, FAILED or KILLED (SIGTERM), and closes the run a killed earlier process left RUNNING.
    with owned_run(tracker, cfg.registry.experiment, cfg.name, tags, workdir) as run_id:
        tracker.log_params(run_id, cfg.resolved())
        dataset = dataset_input(cfg.data.dvc_file, cfg.data.path, version, lineage["git_commit"])
        if dataset:
            tracker.log_dataset(run_id, **dataset, context="train")
        (workdir / "config.json").write_text(json.dumps(cfg.resolved(), indent=2) + "\n")
        tracker.log_artifacts(run_id, workdir / "config.json")
        if remote:
            trained = train_elsewhere(remote, cfg, version, tracker, run_id, fresh, workdir)
        else:
            trained = train_model(cfg, version, tracker, run_id, fresh)
        summary = register_export_promote(cfg, tracker, run_id, trained, workdir)
        summary |= {"data_version": version, "lineage": lineage, "seconds": round(time.perf_counter() - started, 1)}
        path = summary_path or workdir / "run-summary.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2) + "\n")
        tracker.log_artifacts(run_id, path)
    publish_retrain(summary, tracker.client.get_run(run_id).info.experiment_id)  # the Prefect UI's view
    print_summary(summary, path)
    return summary


def check_deployment(name: str) -> None:
    """The `train` deployment must exist on the server this flow reports to (not Prefect's throw-away one)."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    if name.count("/") != 1:
        raise TrainDeploymentError(f"train_deployment {name!r}: give FLOW/DEPLOYMENT, e.g. train/train-gpu")
    try:
        with get_client(sync_client=True) as client:
            client.read_deployment_by_name(name)
    except ObjectNotFound:
        where = PREFECT_API_URL.value() or "Prefect's embedded server (PREFECT_API_URL is not set)"
        raise TrainDeploymentError(
            f"no deployment {name!r} on {where}: install them with `transflow schedule install` against your "
            "Prefect server (PREFECT_API_URL), or leave train_deployment empty to train in this process"
        ) from None


def train_elsewhere(
    remote: dict[str, Any], cfg: RunConfig, version: str, tracker: Tracker, run_id: str, fresh: bool, workdir: Path
) -> Trained:
    """Run the `train` deployment as a subflow and wait; then read its model and results back from the run."""
    from prefect.deployments import run_deployment

    parameters = {
        "config_path": remote["config_path"],
        "overrides": remote["overrides"],
        "data_version": version,
        "run_id": run_id,
        "tracking_uri": tracker.uri,
        "fresh": fresh,
    }
    print(f"training on deployment {remote['deployment']} (data {version[:12]}, MLflow run {run_id})")
    child = run_deployment(remote["deployment"], parameters=parameters, timeout=None, poll_interval=5)
    if child.state is None or not child.state.is_completed():
        state = child.state.name if child.state else "unknown"
        raise TrainDeploymentError(
            f"training run {child.name} of {remote['deployment']} ended {state}: "
            f"{child.state.message if child.state else ''}"
        )
    return load_trained(cfg, tracker, run_id, workdir / "trained")


@task(**LIVE)
def load_trained(cfg: RunConfig, tracker: Tracker, run_id: str, into: Path) -> Trained:
    """The trained model and results from the run's artifacts, plus the test split encoded for the export."""
    results = json.loads(tracker.download(f"runs:/{run_id}/{TRAINING_JSON}", into).read_text())
    adapter, model, _ = load_model_dir(tracker.download(f"runs:/{run_id}/{MODEL_ARTIFACT}", into))
    dataset = load_dataset(cfg.data, seed=cfg.training.seed)
    return Trained(results, model, adapter, encode_splits(adapter, dataset, ("test",)), dataset, None)


@task(retries=2, retry_delay_seconds=5, **LIVE)
def register_model(tracker: Tracker, run_id: str, model_name: str, tags: dict[str, str], pyfunc: bool = True) -> str:
    """Register the run's MLflow model (idempotent by run id) as `challenger`: a LoggedModel that the export fills
    with the pyfunc over the verified bundle. Without an export (`pyfunc=False`) the run's training-format
    `model/` directory is registered as before: not loadable by `mlflow.pyfunc`, and never promotable."""
    model_id = tracker.create_logged_model(run_id) if pyfunc else None
    return tracker.register(run_id, model_name, MODEL_ARTIFACT, tags, model_id=model_id)


def register_export_promote(
    cfg: RunConfig, tracker: Tracker, run_id: str, trained: Trained, workdir: Path
) -> dict[str, Any]:
    metric, results = cfg.evaluation.metric, trained.results
    version, exported, promotion = None, None, None
    if cfg.registry.enabled:
        tags = tracker.client.get_run(run_id).data.tags
        version_tags = {k: v for k, v in tags.items() if not k.startswith("mlflow.")} | {
            f"test_{metric}": f"{results['test'][metric]:.4f}",
            "classes": json.dumps(results["classes"]),
        }
        version = register_model(tracker, run_id, cfg.registry.model_name, version_tags, cfg.export.enabled)
        if cfg.export.enabled:
            exported = export_and_log(
                tracker,
                run_id,
                {"name": cfg.registry.model_name, "version": version, "lineage": version_tags},
                trained.model,
                trained.adapter,
                trained.encoded.batches(trained.adapter, "test", cfg.training.eval_batch_size, sort=True),
                trained.dataset.test.items,
                results["classes"],
                cfg.export,
                workdir / "export",
                trained.test_logits,
                calibration_items=trained.dataset.validation.items,
            )
            if cfg.export.report:  # before the gate: the decision reads and links it
                exported["report"] = report_after_export(
                    tracker, cfg.registry.model_name, version, workdir / "export" / "report",
                    trained, workdir / "report-work", cfg.training.eval_batch_size,
                )  # fmt: skip
    if version:  # metrics against the run's baselines and the data version, on the registry page
        tags = tracker.client.get_run(run_id).data.tags  # baselines.* are set by the training step
        description = version_description(results | {"run_id": run_id}, metric, tags.get("data_version", ""), tags)
        tracker.describe_version(cfg.registry.model_name, version, description)
    if version and cfg.registry.auto_promote:
        promotion = auto_promote(tracker, cfg.registry.model_name, version, cfg.training.device, workdir)
    distilled = None
    if version and exported and cfg.export.distill:  # the rung below int8: a smaller model, judged by its own gate
        from flows.distill import distill_flow

        distilled = distill_flow(f"{cfg.registry.model_name}/{version}", out=str(workdir / "distill"),
                                 promote=cfg.registry.auto_promote, tracking_uri=tracker.uri)  # fmt: skip
    return {
        "promotion": promotion,
        "distill": distilled,
        "export": exported,
        "run_id": run_id,
        "model_name": cfg.registry.model_name,
        "model_version": version,
        "alias": "challenger",
        "tracking_uri": tracker.uri,
        **results,
    }


def print_summary(summary: dict[str, Any], path: Path) -> None:
    table = Table("model", "best val", "test accuracy", "test macro-F1", "seconds", title="retrain summary")
    metric = next((k for k in summary["stages"][0] if k.startswith("best_val_")), "best_val")
    for s in summary["stages"]:
        p = s.get("resumed_from")
        note = " (skipped: finished before)" if s["resumed"] else ""
        note = f" (continued from epoch {p['epoch']} batch {p['batch']} step {p['step']})" if p else note
        table.add_row(
            f"stage {s['name']}{note}",
            f"{s[metric]:.4f}",
            f"{s['test']['accuracy']:.4f}",
            f"{s['test']['macro_f1']:.4f}",
            f"{s['seconds']:.0f}",
        )
    for name, m in summary["baselines"].items():
        table.add_row(f"baseline {name}", "", f"{m['accuracy']:.4f}", f"{m['macro_f1']:.4f}", "")
    console.print(table)
    if summary.get("selected_stage"):
        console.print(f"model = stage {summary['selected_stage']['name']}: {summary['selected_stage']['why']}")
    check = summary.get("baseline_check")
    if check is None:
        console.print("[bold yellow]no baselines evaluated (evaluation.baselines: false): nothing says this model "
                      "beats a linear one[/]")  # fmt: skip
    elif not check["passed"]:
        console.print(f"[bold white on red] THIS MODEL LOSES TO ITS BASELINE [/] {check['detail']}: the promotion "
                      "gate refuses it (registry.require_beats_baselines)")  # fmt: skip
    else:
        console.print(f"[green]beats its baselines:[/] {check['detail']}")
    if summary.get("promotion"):
        p = summary["promotion"]
        console.print(f"auto-promotion: {p['outcome']}: {'; '.join(p['reasons'])}")
    if summary.get("export"):
        e = summary["export"]
        console.print(
            f"bundle {e['bundle_tar']} (sha256 {e['bundle_sha256'][:12]}), default {e['default_model']}; "
            f"fp32 parity max |Δ| {e['fp32_max_abs_diff']:.1e}; {e['int8_reason']}"
        )
    if summary.get("distill"):
        d = summary["distill"]
        console.print(f"distilled student v{d['student_version']} (alias {d['alias']}): {d['reason']}")
    if summary["model_version"] is None:
        console.print(f"not registered (registry.enabled: false); run {summary['run_id']}\nsummary: {path}")
        return
    console.print(
        f"registered [bold]{summary['model_name']}[/] version {summary['model_version']} (alias challenger), "
        f"data {summary['data_version'][:12]}, run {summary['run_id']}, {summary['seconds']:.0f}s\nsummary: {path}"
    )
