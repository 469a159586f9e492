"""One fine-tuning stage, data-parallel: the entry point of each `torchrun` rank.

The calling process (`run_stage` → `launch_data_parallel` in tasks/finetune.py) writes the model's current
weights to `stages/<label>/start.safetensors` and starts `python -m torch.distributed.run --standalone
--nproc-per-node N -m tasks.ddp_stage …`. Each rank rebuilds the same model from the run's `config.json` and
those weights, joins the process group (NCCL, one GPU per rank, or gloo on CPU) and runs the very stage code
of the one-process path (`run_stage.fn`) on its shard of every epoch. Rank 0 logs to the stage's MLflow run
and writes `final.safetensors` + `done.json`, which the caller then loads: weights cross process boundaries
as files, never as pickles.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch.distributed as dist

from models import distributed
from models.trainer import load_state
from runconfig import RunConfig
from tasks.data import load_dataset
from tasks.finetune import RUN_CONFIG, apply_threads, encode_splits, load_backbone, run_stage, stage_dir
from tasks.tracking import Tracker


def run_rank(workdir: Path, index: int, device: str, tracking_uri: str, stage_run_id: str) -> None:
    """One rank: the same model, data and stage as the caller, then the one-process stage code."""
    device = distributed.init_from_env(cuda=device.startswith("cuda"))
    try:
        cfg = RunConfig.model_validate(json.loads((workdir / RUN_CONFIG).read_text()))
        stage, tracker = cfg.stages[index], Tracker(tracking_uri)
        apply_threads(cfg.training)  # else torchrun's OMP_NUM_THREADS=1
        dataset = load_dataset(cfg.data, seed=cfg.training.seed)
        for turn in range(distributed.world_size()):  # one at a time: a registry backbone is downloaded once
            if turn == distributed.rank():
                adapter, model = load_backbone.fn(
                    cfg.backbone, cfg.data.modality, len(dataset.classes), tracker, workdir, cfg.training.seed
                )
            distributed.barrier()
        load_state(model, stage_dir(workdir, stage) / "start.safetensors")
        encoded = encode_splits(adapter, dataset, ("train", "validation"))  # the ranks never test
        metric = cfg.evaluation.metric
        run_stage.fn(
            model, adapter, encoded, None, stage, index, cfg.training, metric, device, workdir, tracker, stage_run_id
        )
        distributed.barrier()  # rank 0 has written done.json
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--run-id", required=True)
    args = parser.parse_args(argv)
    run_rank(args.workdir, args.index, args.device, args.tracking_uri, args.run_id)


if __name__ == "__main__":
    main()
