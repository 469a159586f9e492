"""`train`: the heavy part of retraining — frozen features, the staged fine-tuning, test metrics, baselines.

`retrain` runs it inline by default (one process, the embedded default). With `train_deployment` set,
`retrain` starts it as its own Prefect deployment, e.g. `train/train-gpu` on the `gpu` work pool, and
passes everything by reference: the config path and overrides, the DVC data version the worker must have,
the MLflow tracking URI and the parent run id. The flow writes back by reference too: the model directory as
the run's `model/` artifact and its results as `training.json`, both read by `retrain` from MLflow.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from models.backbone import Adapter, HeadOnly, TransferModel
from models.batching import feature_batches
from runconfig import RunConfig, load_config
from tasks import data as data_tasks
from tasks.evaluate import baseline_verdict, baselines, evaluate_model, plot_curves
from tasks.finetune import (
    RUN_CONFIG,
    Encoded,
    apply_threads,
    encode,
    extract_frozen_features,
    finished,
    load_backbone,
    resolve_device,
    restore_stage,
    run_stage,
    use_bf16,
)
from tasks.gpu import preflight
from tasks.model_dir import write_model_dir
from tasks.prefect_options import LIVE
from tasks.tracking import Tracker

TRAINING_JSON = "training.json"  # the run artifact `retrain` reads the results from
MODEL_ARTIFACT = "model"  # the run artifact holding the fine-tuned model directory

gpu_preflight = task(preflight, name="gpu-preflight", retries=0, cache_policy=NO_CACHE)  # a GPU frees up or not


@task(retries=1, retry_delay_seconds=2)
def verify_data(dvc_file: Path | None) -> str:
    """Fail before any training if the data on disk is not the version `data.dvc` pins."""
    if dvc_file is None:
        return "unversioned"
    report = data_tasks.ensure_data(dvc_file)  # a worker without the pinned data pulls it (`dvc pull`) first
    if not report.ok:
        raise data_tasks.DataError(f"data does not match {dvc_file}:\n" + "\n".join(report.problems[:20]))
    return report.version


@task(**LIVE)
def load_data(cfg: RunConfig) -> data_tasks.Dataset:
    return data_tasks.load_dataset(cfg.data, seed=cfg.training.seed)


@dataclass
class Trained:
    """What the heavy part produced: JSON results (also in the run) and, inline, the live objects."""

    results: dict[str, Any]
    model: TransferModel
    adapter: Adapter
    encoded: Encoded
    dataset: data_tasks.Dataset
    test_logits: np.ndarray | None  # None when loaded back from the run: the export recomputes them


@flow(name="train", log_prints=True)
def train(
    config_path: str,
    data_version: str,
    run_id: str,
    tracking_uri: str,
    overrides: list[str] | None = None,
    fresh: bool = False,
    require_gpu: bool = False,
    min_free_gib: float = 2.0,
) -> dict[str, Any]:
    """Train into MLflow run `run_id`, on the data version the orchestrator verified; results by reference."""
    cfg = load_config(config_path, [*(overrides or []), *(["training.device=cuda"] if require_gpu else [])])
    if require_gpu:  # before any data is read: a CPU-only worker fails in seconds, naming what is missing
        print(f"GPU preflight: {gpu_preflight(min_free_gib, require_bf16=cfg.training.bf16 is True)}")
    found = verify_data(cfg.data.dvc_file)
    if found != data_version:
        raise data_tasks.DataError(
            f"this worker has data version {found} but the run expects {data_version}: check out the same "
            f"commit and `dvc pull` on the worker (data.dvc_file: {cfg.data.dvc_file})"
        )
    trained = train_model(cfg, data_version, Tracker(tracking_uri), run_id, fresh)
    return trained.results


def workdir_of(cfg: RunConfig, data_version: str) -> Path:
    """Where one config on one data version keeps its stages, plots and model: re-runs resume here."""
    return cfg.workdir(data_version)


def train_model(cfg: RunConfig, data_version: str, tracker: Tracker, run_id: str, fresh: bool = False) -> Trained:
    """Backbone → encode → frozen features → each stage (resumed when done) → test → baselines → plots;
    logs the model directory and `training.json` to the run."""
    apply_threads(cfg.training)
    dataset = load_data(cfg)
    workdir = workdir_of(cfg, data_version)
    if fresh and (workdir / "stages").exists():
        import shutil

        shutil.rmtree(workdir / "stages")
    adapter, model = load_backbone(
        cfg.backbone, cfg.data.modality, len(dataset.classes), tracker, workdir, cfg.training.seed
    )
    encoded = encode(adapter, dataset)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / RUN_CONFIG).write_text(json.dumps(cfg.resolved(), indent=2) + "\n")  # what DDP ranks rebuild from
    device = resolve_device(cfg.training.device)
    bf16 = use_bf16(cfg.training.bf16, device)
    needs_features = cfg.evaluation.baselines or any(s.kind == "probe" for s in cfg.stages)
    features = (
        extract_frozen_features(model, adapter, encoded, cfg.training.eval_batch_size, device)
        if needs_features
        else None
    )
    metric, stages, histories, tests = cfg.evaluation.metric, [], {}, {}
    sampled = tracker.system_metrics(run_id, cfg.training.system_metrics, cfg.training.system_metrics_interval_s)
    with sampled:  # training only: CPU/memory/disk/network while the stages run
        for index, stage in enumerate(cfg.stages):
            outcome = None if any(not s.get("resumed") for s in stages) else finished(workdir, stage)
            if outcome:
                print(f"stage {stage.label}: finished by an earlier run (done.json): skipped, its weights restored")
                restore_stage(model, workdir, stage)
            else:
                child = tracker.start_run(
                    cfg.registry.experiment, f"{cfg.name}/{stage.label}", {"stage": stage.kind}, run_id
                )
                tracker.log_params(child, stage.model_dump(mode="json"))
                outcome = run_stage(
                    model,
                    adapter,
                    encoded,
                    features,
                    stage,
                    index,
                    cfg.training,
                    metric,
                    device,
                    workdir,
                    tracker,
                    child,
                )
            test = _test_stage(
                model, adapter, encoded, features, stage.kind, cfg, dataset.classes, device, bf16, workdir
            )
            rows = [(f"{stage.label}.test_{k}", test[k], 0) for k in ("accuracy", "macro_f1")]
            tracker.log_metrics(run_id, [*rows, (f"{stage.label}.best_val_{metric}", outcome.best_metric, 0)])
            histories[stage.label], tests[stage.label] = outcome.history, test
            stages.append(
                {
                    "name": stage.label,
                    "kind": stage.kind,
                    "best_epoch": outcome.best_epoch,
                    f"best_val_{metric}": outcome.best_metric,
                    "seconds": round(outcome.seconds, 1),
                    "samples_per_second": round(outcome.samples_per_second, 1),
                    "resumed": outcome.resumed,
                    "resumed_from": None if outcome.resumed else outcome.resumed_from,
                    "test": {k: test[k] for k in ("accuracy", "macro_f1")},
                }
            )
    resume = resume_report(stages)
    if resume:
        tracker.set_tags(run_id, resume)
    selected = select_stage(stages, metric, cfg.evaluation.select)
    if selected["name"] != stages[-1]["name"]:  # the model holds the last stage's weights: go back to the best
        restore_stage(model, workdir, cfg.stages[[s["name"] for s in stages].index(selected["name"])])
    print(f"model: stage {selected['name']} ({selected['why']})")
    final = tests[selected["name"]]
    refs = {}
    if cfg.evaluation.baselines:
        train_split, test_split = dataset.train, dataset.test
        refs = baselines(
            adapter,
            train_split.items,
            train_split.labels,
            test_split.items,
            test_split.labels,
            features,
            len(dataset.classes),
        )
        tracker.log_metrics(run_id, [(f"baseline.{n}.test_{k}", v, 0) for n, m in refs.items() for k, v in m.items()])
    verdict = baseline_verdict(final, refs, metric)
    if verdict is not None:
        tracker.set_tags(
            run_id, {"baselines.passed": str(verdict["passed"]).lower(), "baselines.detail": verdict["detail"]}
        )
    curves = plot_curves(histories, metric, workdir / "plots" / "validation_curves.png")
    tracker.log_metrics(run_id, [(f"test_{k}", final[k], 0) for k in ("accuracy", "macro_f1", "loss")])
    for png in (curves, Path(final["confusion_png"])):
        tracker.log_artifacts(run_id, png, "plots")
    (workdir / "classification_report.json").write_text(json.dumps(final["per_class"], indent=2))
    tracker.log_artifacts(run_id, workdir / "classification_report.json")
    model_dir = write_model_dir(
        model, adapter, dataset.classes, cfg.backbone.uri, dataset.test.items[:2], workdir / MODEL_ARTIFACT
    )
    tracker.log_artifacts(run_id, model_dir, MODEL_ARTIFACT)
    results = {
        "classes": dataset.classes,
        "stages": stages,
        "test": {k: final[k] for k in ("accuracy", "macro_f1", "loss")},
        "baselines": refs,
        "baseline_check": verdict,
        "selected_stage": selected,
        "resume": resume,  # what a re-run took over (also the run's resume.* tags); {} for a fresh run
        "sizes": {s: len(dataset.split(s)) for s in ("train", "validation", "test")},
        "device": device,
    }
    (workdir / TRAINING_JSON).write_text(json.dumps(results, indent=2) + "\n")
    tracker.log_artifacts(run_id, workdir / TRAINING_JSON)
    return Trained(results, model, adapter, encoded, dataset, final["logits"])


def resume_report(stages: list[dict[str, Any]]) -> dict[str, str]:
    """What a re-run took over from an earlier one, as run tags: stages skipped as finished, and the stage that
    continued from a checkpoint (epoch, batch, step). Empty for a run that started from scratch."""
    skipped = [s["name"] for s in stages if s["resumed"]]
    continued = [
        f"{s['name']}@epoch={p['epoch']},batch={p['batch']},step={p['step']}"
        for s in stages
        if (p := s.get("resumed_from"))
    ]
    tags = {"resume.skipped": ",".join(skipped)} if skipped else {}
    return tags | ({"resume.continued": ";".join(continued)} if continued else {})


def select_stage(stages: list[dict[str, Any]], metric: str, rule: str) -> dict[str, str]:
    """`evaluation.select`: the stage whose weights become the run's model, and why (validation metric only: the
    test split never chooses). Ties go to the later stage, which saw more training."""
    key = f"best_val_{metric}"
    if rule == "last" or len(stages) == 1:
        last = stages[-1]
        return {"name": last["name"], "rule": rule, "why": f"last stage, validation {metric} {last[key]:.4f}"}
    best = max(reversed(stages), key=lambda s: s[key])
    others = ", ".join(f"{s['name']} {s[key]:.4f}" for s in stages if s is not best)
    return {"name": best["name"], "rule": rule, "why": f"best validation {metric} {best[key]:.4f} (vs {others})"}


def _test_stage(model, adapter, encoded, features, kind, cfg, classes, device, bf16, workdir):
    """Test metrics after a stage; the probe's come from the cached features (same numbers, no encoder pass)."""
    batches = encoded.batches(adapter, "test", cfg.training.eval_batch_size, sort=True)
    target = model
    if kind == "probe" and features is not None:  # same order as the encoder pass: export compares these logits
        target = HeadOnly(model)
        batches = feature_batches(features["test"], encoded.test[1], cfg.training.eval_batch_size, None, batches.order)
    return evaluate_model(target, batches, classes, device, workdir / "plots", bf16)
