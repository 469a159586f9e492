"""One fine-tuning stage, data-parallel: `torchrun` starts `training.processes` ranks of this module.

The calling process (`run_stage`) writes the model's current weights to `stages/<label>/start.safetensors`
and starts `python -m torch.distributed.run --standalone --nproc-per-node N -m tasks.ddp_stage …`. Each rank
rebuilds the same model from the run's `config.json` and those weights, joins the process group (NCCL, one GPU
per rank, or gloo on CPU) and runs the very stage code of the one-process path (`run_stage.fn`) on its shard
of every epoch. Rank 0 logs to the stage's MLflow run and writes `final.safetensors` + `done.json`, which the
caller then loads: weights cross process boundaries as files, never as pickles.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from flows.config import RunConfig, StageConfig
from models.backbone import TransferModel
from models.trainer import save_state

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "config.json"  # written by the train flow into the work directory


class DistributedStageError(RuntimeError):
    """The torchrun workers of a stage failed; the message holds the end of their error output."""


def launch(
    model: TransferModel,
    stage: StageConfig,
    index: int,
    processes: int,
    device: str,
    workdir: Path,
    tracking_uri: str,
    stage_run_id: str,
) -> None:
    """Run stage `index` in `processes` torchrun ranks starting from `model`'s weights; wait for `done.json`."""
    from tasks.finetune import stage_dir

    out = stage_dir(workdir, stage)
    save_state(model, out / "start.safetensors")
    model.cpu()  # the ranks hold the GPUs now; run_stage loads their result back
    (out / "done.json").unlink(missing_ok=True)
    args = ["--workdir", str(workdir), "--index", str(index), "--device", device]
    args += ["--tracking-uri", tracking_uri, "--run-id", stage_run_id]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    errors = out / "ddp-stderr.log"
    print(f"stage {stage.label}: data-parallel on {processes} processes ({device}); errors → {errors}")
    with errors.open("w") as err:
        code = subprocess.run([*cmd, "-m", "tasks.ddp_stage", *args], env=env, stderr=err).returncode
    if code != 0 or not (out / "done.json").is_file():
        tail = "\n".join(errors.read_text(errors="replace").splitlines()[-30:])
        raise DistributedStageError(f"stage {stage.label}: torchrun exited with {code}:\n{tail}")


def run_rank(workdir: Path, index: int, device: str, tracking_uri: str, stage_run_id: str) -> None:
    """One rank: the same model, data and stage as the caller, then the one-process stage code."""
    import torch.distributed as dist

    from models import distributed
    from models.trainer import load_state
    from tasks.data import load_dataset
    from tasks.finetune import apply_threads, encode_splits, load_backbone, run_stage, stage_dir
    from tasks.tracking import Tracker

    device = distributed.init_from_env(cuda=device.startswith("cuda"))
    try:
        cfg = RunConfig.model_validate(json.loads((workdir / CONFIG).read_text()))
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
