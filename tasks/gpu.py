"""GPU preflight: check the worker's GPU before a run loads data, so a misrouted run fails in seconds
with a message naming what is missing (no CUDA build, no visible device, too little free memory, no bf16).
"""

from __future__ import annotations

import os
import socket
from typing import Any

GIB = 1024**3


class GpuPreflightError(RuntimeError):
    """This machine cannot run a GPU job as asked; the message names every missing piece."""


def preflight(min_free_gib: float = 2.0, require_bf16: bool = False) -> dict[str, Any]:
    """Check CUDA is visible, the current device has `min_free_gib` free, and bf16 support.

    Returns what was found (for the run log); raises `GpuPreflightError` naming what is missing.
    Missing bf16 is only an error with `require_bf16` (otherwise training falls back to fp32).
    """
    import torch

    report: dict[str, Any] = {
        "host": socket.gethostname(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
    problems = _visibility_problems(torch, report)
    if not problems:
        report |= _device_report(torch)
        problems = _capacity_problems(report, min_free_gib, require_bf16)
    if problems:
        raise GpuPreflightError(
            f"GPU preflight failed on {report['host']}: " + "; ".join(problems) + ". "
            "Run on a GPU worker (`prefect worker start --pool gpu` on a machine with a GPU), "
            "or use the `retrain` deployment on the `cpu` pool."
        )
    return report


def _visibility_problems(torch: Any, report: dict[str, Any]) -> list[str]:
    if torch.version.cuda is None:
        return [f"this torch build ({torch.__version__}) has no CUDA support: install a CUDA build of torch"]
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        hidden = report["cuda_visible_devices"]
        where = f"CUDA_VISIBLE_DEVICES={hidden!r}" if hidden is not None else "CUDA_VISIBLE_DEVICES unset"
        return [
            f"CUDA is not visible: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU "
            f"({where}); check the driver with `nvidia-smi`"
        ]
    return []


def _device_report(torch: Any) -> dict[str, Any]:
    index = torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    return {
        "device_count": torch.cuda.device_count(),
        "device": f"cuda:{index}",
        "name": torch.cuda.get_device_name(index),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(index))),
        "free_gib": round(free / GIB, 2),
        "total_gib": round(total / GIB, 2),
        "bf16": bool(torch.cuda.is_bf16_supported()),
    }


def _capacity_problems(report: dict[str, Any], min_free_gib: float, require_bf16: bool) -> list[str]:
    problems = []
    if report["free_gib"] < min_free_gib:
        problems.append(
            f"{report['device']} ({report['name']}) has {report['free_gib']:.2f} GiB free of "
            f"{report['total_gib']:.2f} GiB, need at least {min_free_gib:g} GiB: another job holds the GPU"
        )
    if require_bf16 and not report["bf16"]:
        problems.append(
            f"{report['device']} ({report['name']}, compute capability {report['capability']}) has no bf16 "
            "support but training.bf16 is true: set training.bf16 to null (auto) or false"
        )
    return problems
