"""The pretraining flow: masked image modelling or supervised source-task training for ViT, masked language
modelling for text. The encoder it produces is registered as a backbone model with alias `latest`, so a run
config can start from `models:/<backbone>@latest`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from prefect import flow, task
from rich.console import Console

from flows.train import verify_data
from models.backbone import Adapter, TransferModel
from models.batching import Batches, shuffled
from models.pretraining import mim_model, mlm_collate, mlm_model, pretrain, random_patch_mask
from models.stages import StageSpec, train_stage
from models.trainer import FitPlan, evaluate, seed_everything
from runconfig import PretrainConfig, load_pretrain_config
from tasks import data as data_tasks
from tasks.finetune import Encoded, encode, load_backbone, resolve_device
from tasks.lineage import collect_lineage
from tasks.model_dir import write_backbone_dir
from tasks.prefect_options import LIVE
from tasks.tracking import Tracker, resolve_tracking_uri

console = Console()
BACKBONE_ALIAS = "latest"


@flow(name="pretrain", log_prints=True)
def pretrain_flow(config_path: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Pretrain (or continue pretraining) a backbone and register it as `<registry.model_name>@latest`."""
    return run_pretrain(load_pretrain_config(config_path, overrides or []))


def run_pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    started = time.perf_counter()
    version = verify_data(cfg.data.dvc_file)
    dataset = data_tasks.load_dataset(cfg.data, seed=cfg.training.seed)
    tracker = Tracker(resolve_tracking_uri(cfg.registry.tracking_uri))
    workdir = cfg.output_dir / f"{cfg.name}-{version[:8]}-{cfg.config_hash()[:8]}"
    adapter, model = load_backbone(
        cfg.backbone, cfg.data.modality, len(dataset.classes), tracker, workdir, cfg.training.seed
    )
    encoded = encode(adapter, dataset)
    device = resolve_device(cfg.training.device)
    lineage = collect_lineage(cfg.data.dvc_file, cfg.config_hash()) | {
        "backbone": cfg.backbone.uri,
        "objective": cfg.pretrain.objective,
        "kind": "backbone",
    }
    run_id = tracker.start_run(cfg.registry.experiment, cfg.name, lineage)
    try:
        tracker.log_params(run_id, cfg.resolved())
        seed_everything(cfg.training.seed)
        encoder, history = train_objective(cfg, adapter, model, encoded, device, tracker, run_id, workdir)
        out = write_backbone_dir(
            encoder, adapter, {"objective": cfg.pretrain.objective, "source": cfg.backbone.uri}, workdir / "backbone"
        )
        tracker.log_artifacts(run_id, out, "backbone")
        backbone_version = tracker.register(run_id, cfg.registry.model_name, "backbone", lineage, alias=BACKBONE_ALIAS)
        tracker.end_run(run_id)
    except BaseException:
        tracker.end_run(run_id, "FAILED")
        raise
    summary = {
        "run_id": run_id,
        "backbone": f"models:/{cfg.registry.model_name}@{BACKBONE_ALIAS}",
        "version": backbone_version,
        "objective": cfg.pretrain.objective,
        "data_version": version,
        "history": history,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (workdir / "pretrain-summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    console.print(
        f"registered backbone [bold]{summary['backbone']}[/] (version {backbone_version}) in {summary['seconds']:.0f}s"
    )
    return summary


@task(**LIVE)
def train_objective(
    cfg: PretrainConfig,
    adapter: Adapter,
    model: TransferModel,
    data: Encoded,
    device: str,
    tracker: Tracker,
    run_id: str,
    workdir: Path,
) -> tuple[torch.nn.Module, list[dict[str, float]]]:
    """Run the configured objective; return the bare encoder and the per-epoch history."""
    p, t = cfg.pretrain, cfg.training

    def log(row: dict[str, float]) -> None:
        tracker.log_metrics(run_id, [(k, v, int(row["epoch"])) for k, v in row.items() if k != "epoch"])

    if p.objective == "supervised":
        spec = StageSpec(
            kind="full",
            epochs=p.epochs,
            lr=p.lr,
            weight_decay=p.weight_decay,
            warmup_ratio=p.warmup_ratio,
            schedule=p.schedule,
            label_smoothing=p.label_smoothing,
        )
        val = data.batches(adapter, "validation", t.eval_batch_size)
        result = train_stage(
            model,
            spec,
            lambda e: data.batches(adapter, "train", t.batch_size, t.seed * 1000 + e),
            val,
            FitPlan(epochs=p.epochs, device=device),
            workdir / "supervised.safetensors",
            adapter.lora_targets,
            log,
            "supervised",
        )
        tracker.log_metrics(
            run_id,
            [
                (f"test_{k}", v, 0)
                for k, v in evaluate(model, data.batches(adapter, "test", t.eval_batch_size), device).items()
            ],
        )
        return model.encoder, result.history
    items = data.train[0]
    if p.objective == "mim":
        net = mim_model(model.encoder)
        patches = (net.config.image_size // net.config.patch_size) ** 2
        generator = torch.Generator().manual_seed(t.seed)

        def collate(rows: list[Any]) -> dict[str, torch.Tensor]:
            pixels = adapter.collate(rows, True)["pixel_values"]
            return {
                "pixel_values": pixels,
                "bool_masked_pos": random_patch_mask(len(rows), patches, p.mask_ratio, generator),
            }
    else:
        net = mlm_model(model.encoder)
        collate = mlm_collate(adapter.tokenizer, p.mask_ratio)

    def batches(epoch: int) -> list[dict[str, torch.Tensor]]:
        return [
            inputs
            for inputs, _ in Batches(
                items, [0] * len(items), t.batch_size, collate, shuffled(len(items), t.seed + epoch)
            )
        ]

    result = pretrain(net, batches, p.epochs, p.lr, p.weight_decay, p.warmup_ratio, device, p.objective, log)
    encoder = net.vit if p.objective == "mim" else net.base_model
    return encoder, result.history
