"""Complete, crash-safe training checkpoints: model, optimizer, scheduler, RNG states and loop position.

Tensors go to safetensors, everything else to JSON (no pickle). A checkpoint is written into
`step-….tmp/`, every file is fsynced, a `COMPLETE` marker is written last (atomically, `models.durable`), the
directory is fsynced and renamed, and its parent fsynced: a process killed (or a machine losing power) at any
instant leaves either the previous checkpoint or the new one, never half of one that gets picked. A checkpoint
that is damaged anyway (a disk error, a copy cut short) is reported and skipped for the one before it.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from models.durable import fsync_dir, fsync_file, write_atomic

COMPLETE = "COMPLETE"
KEEP = 2
FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")
log = logging.getLogger("transflow.checkpoint")


def _optimizer_split(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """torch optimizer state → (tensors for safetensors, the JSON rest)."""
    tensors, scalars = {}, {}
    for index, slots in state["state"].items():
        for key, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_join(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in [*tensors.items(), *meta["scalars"].items()]:
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    version, internal, gauss = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(cached)], "python": [version, list(internal), gauss]}
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def write_checkpoint(
    root: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, position: dict[str, Any]
) -> Path:
    """Write one complete checkpoint under `root` and prune older ones (the newest KEEP stay)."""
    name = f"step-{position['step']:09d}-epoch-{position['epoch']:04d}-batch-{position['batch']:06d}"
    final, tmp = root / name, root / f"{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_files(tmp, model, optimizer, scheduler, position)
    except Exception as exc:  # disk full, quota, I/O error: keep the previous checkpoint, say so
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"could not write checkpoint {name} ({exc}); the previous checkpoint is intact") from exc
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    fsync_dir(root)  # the rename is durable: a power cut cannot bring back the .tmp name
    for old in complete_checkpoints(root)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_files(
    tmp: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, position: dict[str, Any]
) -> None:
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    opt_tensors, opt_meta = _optimizer_split(optimizer.state_dict())
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    rng_tensors, rng_meta = _rng_state()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    state = {"position": position, "optimizer": opt_meta, "scheduler": scheduler.state_dict(), "rng": rng_meta}
    (tmp / "state.json").write_text(json.dumps(state))
    for name in FILES:  # the data is on disk before the marker that vouches for it
        fsync_file(tmp / name)
    write_atomic(tmp / COMPLETE, "ok\n")  # fsyncs the file and the directory


def complete_checkpoints(root: Path) -> list[Path]:
    """Finished checkpoints, oldest first; `.tmp` leftovers and dirs without the marker are ignored."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and not p.name.endswith(".tmp") and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint that reads back; a damaged one is reported and the one before it used."""
    for path in reversed(complete_checkpoints(root)):
        problem = damage(path)
        if problem is None:
            return path
        log.warning("checkpoint %s is damaged (%s): resuming from the one before it", path, problem)
    return None


def damage(path: Path) -> str | None:
    """What is wrong with a checkpoint directory (cheap: JSON parse and safetensors headers), or None."""
    try:
        state = json.loads((path / "state.json").read_text())
        if not isinstance(state, dict) or not {"position", "optimizer", "scheduler", "rng"} <= state.keys():
            return "state.json lacks position/optimizer/scheduler/rng"
        for name in FILES[:3]:
            with safe_open(str(path / name), framework="pt"):
                pass
    except (OSError, ValueError, SafetensorError) as exc:  # JSONDecodeError is a ValueError
        return f"{type(exc).__name__}: {exc}"
    return None


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    """Restore everything `write_checkpoint` saved; returns the loop position to continue from."""
    state = json.loads((path / "state.json").read_text())
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    optimizer.load_state_dict(_optimizer_join(load_file(str(path / "optimizer.safetensors")), state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(load_file(str(path / "rng.safetensors")), state["rng"])
    return state["position"]
