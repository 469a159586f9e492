"""Shared benchmark plumbing: machine description, result files, locating the demo's latest run."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import socket
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def machine_info() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError, StopIteration):
        model = next(
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        )
    flags = cpu_flags()
    import torch

    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "avx512f": "avx512f" in flags,
        "avx512_vnni": "avx512_vnni" in flags,
        "amx": any(f.startswith("amx") for f in flags),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def write_result(name: str, results: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.date.today().isoformat()
    path = RESULTS / f"{name}-{socket.gethostname()[:20]}-{stamp}.json"
    path.write_text(json.dumps(results, indent=2, default=float) + "\n")
    return path


def latest_run_dir(root: Path = Path("runs")) -> Path:
    """The most recent retrain run directory that has an exported bundle."""
    candidates = sorted(
        (p.parents[2] for p in root.glob("*/export/bundle/manifest.json")), key=lambda p: p.stat().st_mtime
    )
    if not candidates:
        raise SystemExit(f"no exported run under {root}/: run `make demo` first")
    return candidates[-1]
