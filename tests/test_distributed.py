"""Data-parallel training (DDP) on CPU with gloo: real process groups, real torchrun.

The equivalence test is the contract of the trainer's DDP path: two ranks with batch B each, gradients averaged,
end with the weights one process gets with batch 2B over the same examples. The flow test runs the smoke retrain
with `training.processes=2`, so the partial and LoRA stages go through `torchrun` and come back through files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file, save_file
from torch import nn

from models.distributed import RankShard, shard
from models.trainer import FitPlan, fit
from tests.prefect_server import ROOT, free_port  # not tests.conftest: spawned ranks import this module

WORLD, BATCH, N_BATCHES, EPOCHS = 2, 4, 6, 2


class Tiny(nn.Module):
    """No dropout, no randomness in forward: runs differ only in how the gradient is computed."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def examples() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(WORLD * BATCH * N_BATCHES, 5, generator=generator)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()


def batches_of(size: int) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    x, y = examples()
    return [({"x": x[i : i + size]}, y[i : i + size]) for i in range(0, len(y), size)]


def train_tiny(out: Path) -> dict[str, torch.Tensor]:
    """Per-rank batches of BATCH (rank r takes batches r, r+2, …) under DDP, or 2·BATCH in one process."""
    from models import distributed

    model = Tiny()
    size = BATCH if distributed.active() else WORLD * BATCH
    groups = [{"params": list(model.parameters()), "lr": 0.05, "weight_decay": 0.01}]
    plan = FitPlan(epochs=EPOCHS, max_grad_norm=1.0, metric="accuracy")
    fit(model, groups, lambda epoch: batches_of(size), batches_of(16), plan, out / "best.safetensors")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        save_file(train_tiny(Path(out)), f"{out}/rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


def test_rank_shards_split_every_epoch_evenly() -> None:
    batches = list(range(7))
    shards = [list(RankShard(batches, r, 3)) for r in range(3)]
    assert shards == [[0, 3], [1, 4], [2, 5]], "same count on every rank; the tail batch is dropped"
    assert len(RankShard(batches, 0, 3)) == 2
    with pytest.raises(IndexError):
        RankShard(batches, 1, 3)[2]
    assert shard(batches) is batches, "no process group: the batches as they are"


def test_two_gloo_ranks_match_one_process_with_the_doubled_batch(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    single_dir = tmp_path / "single"
    single_dir.mkdir()
    single = train_tiny(single_dir)
    mp.spawn(_rank, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(WORLD)]
    start = Tiny().state_dict()
    for name, weight in single.items():
        assert not torch.allclose(weight, start[name]), f"{name} did not train"
        torch.testing.assert_close(ranks[0][name], ranks[1][name], rtol=0, atol=0)  # DDP keeps ranks in step
        torch.testing.assert_close(ranks[0][name], weight, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.integration
def test_retrain_with_two_processes_runs_stages_through_torchrun(
    tweets_repo: Path, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    from flows.retrain import retrain

    overrides = [
        f"data.path={tweets_repo / 'data'}",
        f"data.dvc_file={tweets_repo / 'data.dvc'}",
        f"backbone.uri={tiny_bert_dir}",
        f"output_dir={tmp_path / 'runs'}",
        f"registry.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "training.processes=2",
        "export.enabled=false",
    ]
    summary = retrain(str(ROOT / "configs/smoke-text.yaml"), overrides)
    assert [s["kind"] for s in summary["stages"]] == ["probe", "partial", "lora"]
    [workdir] = (tmp_path / "runs").iterdir()
    for stage in ("partial", "lora"):
        stage_dir = workdir / "stages" / stage
        assert (stage_dir / "start.safetensors").is_file(), "the ranks started from the caller's weights"
        done = json.loads((stage_dir / "done.json").read_text())
        assert done["history"] and done["samples_per_second"] > 0
    start = load_file(str(workdir / "stages" / "partial" / "start.safetensors"))
    final = load_file(str(workdir / "stages" / "partial" / "final.safetensors"))
    assert any(not torch.equal(start[k], final[k]) for k in start), "the partial stage changed the weights"
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    stage_runs = {
        r.info.run_name: r
        for r in client.search_runs(
            [client.get_experiment_by_name("transflow").experiment_id],
            f"tags.mlflow.parentRunId = '{summary['run_id']}'",
        )
    }
    for stage in ("partial", "lora"):
        run = stage_runs[f"smoke-text/{stage}"]
        history = client.get_metric_history(run.info.run_id, "val_macro_f1")
        assert [m.step for m in history] == [1], "one epoch, logged once: by rank 0 only"
    assert summary["model_version"] == "1"
