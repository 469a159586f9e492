"""The retraining flow, the main job: verify data → load backbone → staged fine-tuning → evaluate → register.

Runs on Prefect's local (ephemeral) server with no set-up, or on a real server when PREFECT_API_URL is set.
One MLflow parent run per flow run, a nested run per stage; the run id is passed to tasks explicitly.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

from prefect import flow, task
from rich.console import Console
from rich.table import Table

from flows.config import RunConfig, load_config
from models.backbone import HeadOnly
from models.batching import feature_batches
from tasks import data as data_tasks
from tasks.evaluate import baselines, evaluate_model, plot_curves
from tasks.export import build_bundle, report_dict
from tasks.export import version_tags as export_tags
from tasks.finetune import (
    LIVE,
    encode,
    extract_frozen_features,
    finished,
    load_backbone,
    resolve_device,
    restore_stage,
    run_stage,
    use_bf16,
)
from tasks.lineage import collect_lineage
from tasks.register import register_model, write_model_dir
from tasks.tracking import Tracker, resolve_tracking_uri

console = Console()


@task(retries=1, retry_delay_seconds=2)
def verify_data(dvc_file: Path | None) -> str:
    """Fail before any training if the data on disk is not the version `data.dvc` pins."""
    if dvc_file is None:
        return "unversioned"
    report = data_tasks.verify_data(dvc_file)
    if not report.ok:
        raise data_tasks.DataError(f"data does not match {dvc_file}:\n" + "\n".join(report.problems[:20]))
    return report.version


@task(**LIVE)
def load_data(cfg: RunConfig) -> data_tasks.Dataset:
    return data_tasks.load_dataset(cfg.data, seed=cfg.training.seed)


@flow(name="retrain", log_prints=True)
def retrain(
    config_path: str, overrides: list[str] | None = None, summary_path: str | None = None, fresh: bool = False
) -> dict[str, Any]:
    """Fine-tune the configured backbone on the configured data and register a `challenger` version."""
    cfg = load_config(config_path, overrides or [])
    return run_retrain(cfg, Path(summary_path) if summary_path else None, fresh)


def run_retrain(cfg: RunConfig, summary_path: Path | None = None, fresh: bool = False) -> dict[str, Any]:
    started = time.perf_counter()
    version = verify_data(cfg.data.dvc_file)
    dataset = load_data(cfg)
    tracker = Tracker(resolve_tracking_uri(cfg.registry.tracking_uri))
    workdir = cfg.output_dir / f"{cfg.name}-{version[:8]}-{cfg.config_hash()[:8]}"
    if fresh and (workdir / "stages").exists():
        import shutil

        shutil.rmtree(workdir / "stages")
    adapter, model = load_backbone(
        cfg.backbone, cfg.data.modality, len(dataset.classes), tracker, workdir, cfg.training.seed
    )
    encoded = encode(adapter, dataset)
    device = resolve_device(cfg.training.device)
    bf16 = use_bf16(cfg.training.bf16, device)

    lineage = collect_lineage(cfg.data.dvc_file, cfg.config_hash()) | {"backbone": cfg.backbone.uri}
    if cfg.backbone.uri.startswith("models:/"):  # pin what the alias meant at training time
        lineage["backbone_version"] = "/".join(tracker.resolve_version(cfg.backbone.uri))
    run_id = tracker.start_run(cfg.registry.experiment, cfg.name, lineage)
    try:
        summary = _train_evaluate_register(
            cfg, tracker, run_id, dataset, adapter, model, encoded, device, bf16, workdir
        )
        summary |= {"data_version": version, "lineage": lineage, "seconds": round(time.perf_counter() - started, 1)}
        path = summary_path or workdir / "run-summary.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2) + "\n")
        tracker.log_artifacts(run_id, path)
        tracker.end_run(run_id)
    except BaseException:
        with contextlib.suppress(Exception):  # the tracking server may be what failed: keep the first error
            tracker.end_run(run_id, "FAILED")
        raise
    print_summary(summary, path)
    return summary


def _train_evaluate_register(cfg, tracker, run_id, dataset, adapter, model, encoded, device, bf16, workdir):
    tracker.log_params(run_id, cfg.resolved())
    needs_features = cfg.evaluation.baselines or any(s.kind == "probe" for s in cfg.stages)
    features = (
        extract_frozen_features(model, adapter, encoded, cfg.training.eval_batch_size, device)
        if needs_features
        else None
    )
    metric, stages, histories = cfg.evaluation.metric, [], {}
    for index, stage in enumerate(cfg.stages):
        outcome = None if any(not s.get("resumed") for s in stages) else finished(workdir, stage)
        if outcome:
            restore_stage(model, workdir, stage)
        else:
            child = tracker.start_run(
                cfg.registry.experiment, f"{cfg.name}/{stage.label}", {"stage": stage.kind}, run_id
            )
            tracker.log_params(child, stage.model_dump(mode="json"))
            outcome = run_stage(
                model, adapter, encoded, features, stage, index, cfg.training, metric, device, workdir, tracker, child
            )
        test = _test_stage(model, adapter, encoded, features, stage.kind, cfg, dataset.classes, device, bf16, workdir)
        rows = [(f"{stage.label}.test_{k}", test[k], 0) for k in ("accuracy", "macro_f1")]
        tracker.log_metrics(run_id, [*rows, (f"{stage.label}.best_val_{metric}", outcome.best_metric, 0)])
        histories[stage.label] = outcome.history
        stages.append(
            {
                "name": stage.label,
                "kind": stage.kind,
                "best_epoch": outcome.best_epoch,
                f"best_val_{metric}": outcome.best_metric,
                "seconds": round(outcome.seconds, 1),
                "samples_per_second": round(outcome.samples_per_second, 1),
                "resumed": outcome.resumed,
                "test": {k: test[k] for k in ("accuracy", "macro_f1")},
            }
        )
    final = test
    refs = {}
    if cfg.evaluation.baselines:
        train, test_split = dataset.train, dataset.test
        refs = baselines(
            adapter, train.items, train.labels, test_split.items, test_split.labels, features, len(dataset.classes)
        )
        tracker.log_metrics(run_id, [(f"baseline.{n}.test_{k}", v, 0) for n, m in refs.items() for k, v in m.items()])
    curves = plot_curves(histories, metric, workdir / "plots" / "validation_curves.png")
    tracker.log_metrics(run_id, [(f"test_{k}", final[k], 0) for k in ("accuracy", "macro_f1", "loss")])
    for png in (curves, Path(final["confusion_png"])):
        tracker.log_artifacts(run_id, png, "plots")
    (workdir / "classification_report.json").write_text(json.dumps(final["per_class"], indent=2))
    tracker.log_artifacts(run_id, workdir / "classification_report.json")

    (workdir / "config.json").write_text(json.dumps(cfg.resolved(), indent=2) + "\n")
    tracker.log_artifacts(run_id, workdir / "config.json")
    version, exported = None, None
    if cfg.registry.enabled:
        model_dir = write_model_dir(
            model, adapter, dataset.classes, cfg.backbone.uri, dataset.test.items[:2], workdir / "model"
        )
        tags = tracker.client.get_run(run_id).data.tags
        version_tags = {k: v for k, v in tags.items() if not k.startswith("mlflow.")} | {
            f"test_{metric}": f"{final[metric]:.4f}",
            "classes": json.dumps(dataset.classes),
        }
        version = register_model(tracker, run_id, model_dir, cfg.registry.model_name, version_tags)
        if cfg.export.enabled:
            exported = export_and_log(
                cfg, tracker, run_id, version, model, adapter, encoded, dataset, version_tags, final["logits"], workdir
            )
    promotion = None
    if version and cfg.registry.auto_promote:
        promotion = auto_promote(tracker, cfg.registry.model_name, version, workdir)
    return {
        "promotion": promotion,
        "export": exported,
        "run_id": run_id,
        "model_name": cfg.registry.model_name,
        "model_version": version,
        "alias": "challenger",
        "tracking_uri": tracker.uri,
        "classes": dataset.classes,
        "stages": stages,
        "test": {k: final[k] for k in ("accuracy", "macro_f1", "loss")},
        "baselines": refs,
        "sizes": {s: len(dataset.split(s)) for s in ("train", "validation", "test")},
    }


def export_and_log(cfg, tracker, run_id, version, model, adapter, encoded, dataset, lineage, torch_logits, workdir):
    """Export the registered model, log the bundle and the ONNX flavour, tag the version with the results."""
    meta = {"name": cfg.registry.model_name, "version": version, "lineage": lineage}
    report = build_bundle(
        model,
        adapter,
        encoded.batches(adapter, "test", cfg.training.eval_batch_size, sort=True),
        dataset.test.items,
        dataset.classes,
        meta,
        workdir / "export",
        cfg.export.opset,
        cfg.export.int8,
        cfg.export.int8_budget_pt,
        torch_logits,
    )
    tracker.log_artifacts(run_id, Path(report.bundle_tar), "bundle")
    tracker.log_onnx(run_id, Path(report.bundle_dir) / "model.onnx", workdir / "export")
    tracker.tag_version(cfg.registry.model_name, version, export_tags(report))
    return report_dict(report)


def auto_promote(tracker: Tracker, model_name: str, version: str, workdir: Path) -> dict[str, Any]:
    """`registry.auto_promote`: the same gate as `transflow promote`, on the version just registered."""
    from flows.promote import announce
    from tasks.promote import PromotionError, promote_version

    try:
        decision = promote_version(tracker, model_name, version, workdir=workdir / "promote")
    except PromotionError as exc:  # e.g. export disabled: the version stays challenger, the run still succeeds
        return {"outcome": "not judged", "reasons": [str(exc)]}
    announce(decision, tracker.uri)
    return decision.to_dict()


def _test_stage(model, adapter, encoded, features, kind, cfg, classes, device, bf16, workdir):
    """Test metrics after a stage; the probe's come from the cached features (same numbers, no encoder pass)."""
    batches = encoded.batches(adapter, "test", cfg.training.eval_batch_size, sort=True)
    target = model
    if kind == "probe" and features is not None:  # same order as the encoder pass: export compares these logits
        target = HeadOnly(model)
        batches = feature_batches(features["test"], encoded.test[1], cfg.training.eval_batch_size, None, batches.order)
    return evaluate_model(target, batches, classes, device, workdir / "plots", bf16)


def print_summary(summary: dict[str, Any], path: Path) -> None:
    table = Table("model", "best val", "test accuracy", "test macro-F1", "seconds", title="retrain summary")
    metric = next((k for k in summary["stages"][0] if k.startswith("best_val_")), "best_val")
    for s in summary["stages"]:
        note = " (resumed)" if s["resumed"] else ""
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
    if summary.get("promotion"):
        p = summary["promotion"]
        console.print(f"auto-promotion: {p['outcome']}: {'; '.join(p['reasons'])}")
    if summary.get("export"):
        e = summary["export"]
        console.print(
            f"bundle {e['bundle_tar']} (sha256 {e['bundle_sha256'][:12]}), default {e['default_model']}; "
            f"fp32 parity max |Δ| {e['fp32_max_abs_diff']:.1e}; {e['int8_reason']}"
        )
    if summary["model_version"] is None:
        console.print(f"not registered (registry.enabled: false); run {summary['run_id']}\nsummary: {path}")
        return
    console.print(
        f"registered [bold]{summary['model_name']}[/] version {summary['model_version']} (alias challenger), "
        f"data {summary['data_version'][:12]}, run {summary['run_id']}, {summary['seconds']:.0f}s\nsummary: {path}"
    )
