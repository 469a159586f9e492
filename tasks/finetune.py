"""Backbone loading and the staged fine-tuning tasks.

Each stage writes `stages/<name>/final.safetensors` and a `done.json` marker when it completes, so a
re-run of the same config on the same data skips finished stages and starts from the last one's weights.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from prefect import task
from safetensors import SafetensorError, safe_open

from models import distributed
from models.adapters import make_adapter
from models.backbone import Adapter, TransferModel
from models.batching import Batches, by_length, feature_batches, shuffled
from models.checkpoint import latest_checkpoint
from models.durable import fsync_file, read_json, write_json
from models.stages import StageSpec, frozen_features, train_stage
from models.trainer import FitPlan, load_state, save_state, seed_everything
from runconfig import BackboneConfig, StageConfig, TrainingConfig
from tasks.data import Dataset
from tasks.prefect_options import LIVE
from tasks.tracking import Tracker

ROOT = Path(__file__).resolve().parents[1]
RUN_CONFIG = "config.json"  # the resolved RunConfig the train flow writes into the work directory


def resolve_device(requested: str) -> str:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("training.device is 'cuda' but no CUDA device is visible")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def use_bf16(requested: bool | None, device: str) -> bool:
    supported = device.startswith("cuda") and torch.cuda.is_bf16_supported()
    return supported if requested is None else requested and supported


def apply_threads(training: TrainingConfig) -> None:
    """`training.num_threads`: cap torch's CPU threads (e.g. several runs sharing one machine)."""
    if training.num_threads:
        torch.set_num_threads(training.num_threads)


def use_compile(requested: bool | None, device: str) -> bool:
    """torch.compile pays off on CUDA; on CPU its compile time outweighs short fine-tunes unless asked for."""
    return device.startswith("cuda") if requested is None else requested


@task(**LIVE)
def load_backbone(
    cfg: BackboneConfig, modality: str, num_labels: int, tracker: Tracker, workdir: Path, seed: int = 0
) -> tuple[Adapter, TransferModel]:
    """Resolve the backbone URI (registry, dir, package, hub id) and build encoder + a fresh head, seeded:
    the same config gives the same initial head, so a re-run after a crash matches the original."""
    seed_everything(seed)
    source = cfg.uri
    if source.startswith("models:/"):
        # A pretrained backbone is registered as a plain directory; a fine-tuned task model as a pyfunc whose
        # training-format directory is its run's model/ artifact: training_model_uri finds either.
        source = str(tracker.download(tracker.training_model_uri(source), workdir / "backbone"))
    adapter = make_adapter(modality, cfg.model_dump())
    return adapter, adapter.build(source, num_labels)


@dataclass
class Encoded:
    """The dataset after the adapter's one-time encoding (token ids, or decoded images)."""

    train: tuple[list[Any], list[int]]
    validation: tuple[list[Any], list[int]]
    test: tuple[list[Any], list[int]]

    def batches(
        self, adapter: Adapter, split: str, batch_size: int, seed: int | None = None, sort: bool = False
    ) -> Batches:
        """Training batches shuffled by `seed`; evaluation batches in order, or length-sorted with `sort`."""
        examples, labels = getattr(self, split)
        order = None
        if seed is not None:
            order = shuffled(len(labels), seed)
        elif sort:
            order = by_length(examples, adapter.length)
        return Batches(examples, labels, batch_size, lambda rows: adapter.collate(rows, seed is not None), order)


SPLITS = ("train", "validation", "test")


def encode_splits(adapter: Adapter, dataset: Dataset, splits: tuple[str, ...] = SPLITS) -> Encoded:
    """Encode only `splits`, the others stay empty: the export needs the test split, DDP ranks train + validation
    (decoding images is the costly part of encoding, so nobody encodes what it will not read)."""

    def one(name: str) -> tuple[list[Any], list[int]]:
        split = dataset.split(name)
        return (adapter.encode(split.items), split.labels) if name in splits else ([], [])

    return Encoded(*(one(name) for name in SPLITS))


@task(**LIVE)
def encode(adapter: Adapter, dataset: Dataset) -> Encoded:
    return encode_splits(adapter, dataset)


@task(**LIVE)
def extract_frozen_features(
    model: TransferModel, adapter: Adapter, data: Encoded, batch_size: int, device: str
) -> dict[str, torch.Tensor]:
    """The pretrained encoder's pooled features per split: the probe trains on these, the probe baseline too."""
    model.to(device)
    out = {}
    for split in ("train", "validation", "test"):
        batches = data.batches(adapter, split, batch_size, sort=True)
        computed = frozen_features(model, batches, device, title=f"features {split}")
        out[split] = torch.empty_like(computed)
        out[split][torch.as_tensor(batches.order)] = computed  # back to the split's own order
    return out


@dataclass
class StageOutcome:
    name: str
    kind: str
    best_epoch: int
    best_metric: float
    seconds: float
    samples_per_second: float
    history: list[dict[str, float]]
    step_losses: list[tuple[int, float]]
    resumed: bool = False  # finished by an earlier run: skipped
    resumed_from: dict[str, int] | None = None  # continued from this checkpoint position (epoch, batch, step)


def stage_dir(workdir: Path, stage: StageConfig) -> Path:
    return workdir / "stages" / stage.label


def finished(workdir: Path, stage: StageConfig) -> StageOutcome | None:
    """The outcome of a stage finished by an earlier run, or None (not finished, or its marker or weights are
    damaged: that is reported and the stage is trained again, never a crash)."""
    out = stage_dir(workdir, stage)
    marker, weights = out / "done.json", out / "final.safetensors"
    if not (marker.is_file() and weights.is_file()):
        return None
    recorded = read_json(marker, f"stage {stage.label} marker")
    try:
        with safe_open(str(weights), framework="pt"):
            pass
        outcome = StageOutcome(**{**recorded, "resumed": True})  # type: ignore[arg-type]
    except (TypeError, OSError, SafetensorError) as exc:  # TypeError: None or a record with missing fields
        print(f"stage {stage.label}: finished-stage record is damaged ({type(exc).__name__}): training it again")
        return None
    return outcome


def resume_point(workdir: Path, stage: StageConfig) -> dict[str, int] | None:
    """Where an interrupted stage will continue: the position of its newest readable checkpoint, or None."""
    found = latest_checkpoint(stage_dir(workdir, stage) / "checkpoints")
    state = read_json(found / "state.json", "checkpoint state") if found else None
    if not state:
        return None
    return {k: int(state["position"][k]) for k in ("epoch", "batch", "step")}


@task(**LIVE)
def run_stage(
    model: TransferModel,
    adapter: Adapter,
    data: Encoded,
    features: dict[str, torch.Tensor] | None,
    stage: StageConfig,
    index: int,
    training: TrainingConfig,
    metric: str,
    device: str,
    workdir: Path,
    tracker: Tracker,
    stage_run_id: str,
) -> StageOutcome:
    """Train one stage in place (probe: on cached features), log each epoch, mark it done.

    With `training.processes > 1` the stage runs data-parallel: `torchrun` ranks (tasks/ddp_stage.py) start from
    this model's weights and each call this function (`run_stage.fn`) inside the process group, where only rank 0
    logs and writes; the caller then loads their result from the stage directory."""
    if training.processes > 1 and stage.kind != "probe" and not distributed.active():  # probe: cached, no gain
        launch_data_parallel(model, stage, index, training.processes, device, workdir, tracker.uri, stage_run_id)
        restore_stage(model, workdir, stage)
        outcome = finished(workdir, stage)
        assert outcome is not None, "launch() checks done.json"
        return replace(outcome, resumed=False)
    seed = training.seed + index
    seed_everything(seed)
    model.to(device)
    spec = StageSpec(**stage.model_dump(exclude={"name"}))
    bf16 = use_bf16(training.bf16, device)
    plan = FitPlan(
        epochs=stage.epochs,
        grad_accum_steps=training.grad_accum_steps,
        max_grad_norm=training.max_grad_norm,
        metric=metric,
        device=device,
        bf16=bf16,
        checkpoint_every=training.checkpoint_every_steps,
        compile=use_compile(training.compile, device),
    )
    if stage.kind == "probe":
        if features is None:
            raise ValueError("probe stage needs the frozen features")
        labels = data.train[1]
        train = lambda epoch: feature_batches(features["train"], labels, training.batch_size, seed * 1000 + epoch)  # noqa: E731
        val = feature_batches(features["validation"], data.validation[1], training.eval_batch_size, None)
    else:
        train = lambda epoch: data.batches(adapter, "train", training.batch_size, seed * 1000 + epoch)  # noqa: E731
        val = data.batches(adapter, "validation", training.eval_batch_size, sort=True)

    def log_epoch(row: dict[str, float]) -> None:
        step = int(row["epoch"])
        tracker.log_metrics(stage_run_id, [(k, v, step) for k, v in row.items() if k != "epoch"])

    out = stage_dir(workdir, stage)
    resumed_from = resume_point(workdir, stage) if distributed.is_main() else None
    if resumed_from:
        print(f"stage {stage.label}: continuing from checkpoint epoch {resumed_from['epoch']}, "
              f"batch {resumed_from['batch']}, step {resumed_from['step']}")  # fmt: skip
    result = train_stage(
        model,
        spec,
        train,
        val,
        plan,
        out / "best.safetensors",
        adapter.lora_targets,
        log_epoch,
        stage.label,
        resume_dir=out / "checkpoints",
    )
    outcome = StageOutcome(
        stage.label,
        stage.kind,
        result.best_epoch,
        result.best_metric,
        result.seconds,
        result.samples_per_second,
        result.history,
        result.step_losses,
        resumed_from=resumed_from,
    )
    if distributed.is_main():
        tracker.log_metrics(stage_run_id, [("step_loss", loss, step) for step, loss in result.step_losses])
        save_state(model, out / "final.safetensors")
        fsync_file(out / "final.safetensors")  # the weights are on disk before the marker that vouches for them
        write_json(out / "done.json", asdict(outcome))  # atomic: a crash leaves no marker or a whole one
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # the stage is done: final.safetensors is what counts
    return outcome


def restore_stage(model: TransferModel, workdir: Path, stage: StageConfig) -> None:
    """Load a finished stage's final weights (LoRA is already merged in them)."""
    load_state(model, stage_dir(workdir, stage) / "final.safetensors")


class DistributedStageError(RuntimeError):
    """The torchrun workers of a stage failed; the message holds the end of their error output."""


def launch_data_parallel(
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
