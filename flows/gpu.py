"""`retrain-gpu`: the retraining flow forced onto CUDA, behind a GPU preflight.

Deployed on the `gpu` work pool. A run that lands on a machine without a usable GPU fails in seconds
with a message naming what is missing, before any data is read or any MLflow run is opened.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.config import load_config
from tasks.gpu import preflight

gpu_preflight = task(preflight, name="gpu-preflight", retries=0, cache_policy=NO_CACHE)  # a GPU frees up or not


@flow(name="retrain-gpu", log_prints=True)
def retrain_gpu(
    config_path: str,
    overrides: list[str] | None = None,
    summary_path: str | None = None,
    fresh: bool = False,
    min_free_gib: float = 2.0,
) -> dict[str, Any]:
    """Check the GPU, then run `retrain` with `training.device=cuda` (a subflow, same parameters)."""
    cfg = load_config(config_path, overrides or [])  # a bad config fails before the GPU check
    found = gpu_preflight(min_free_gib, require_bf16=cfg.training.bf16 is True)
    print(f"GPU preflight: {found}")
    from flows.retrain import retrain  # after the preflight: a CPU-only worker fails before loading the stack

    return retrain(config_path, [*(overrides or []), "training.device=cuda"], summary_path, fresh)
