"""Shared benchmark plumbing: the repository root, the machine description, per-benchmark result files."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def cpu_ghz(cpuinfo: str | None = None, lscpu: str | None = None) -> tuple[float, str]:
    """The clock the peak assumes: lscpu's 'CPU max MHz' when the kernel exposes it, else the highest
    'cpu MHz' in /proc/cpuinfo (under a hypervisor that is the nominal clock; turbo is invisible)."""
    if lscpu is None:
        try:
            lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            lscpu = ""
    for line in lscpu.splitlines():
        if line.strip().startswith("CPU max MHz:"):
            return float(line.split(":", 1)[1]) / 1000, "lscpu 'CPU max MHz'"
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    mhz = [float(ln.split(":", 1)[1]) for ln in cpuinfo.splitlines() if ln.startswith("cpu MHz")]
    if mhz:
        return max(mhz) / 1000, "/proc/cpuinfo 'cpu MHz' (nominal under a hypervisor; turbo not visible)"
    return float("nan"), "unknown"


def machine_info() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError, StopIteration):
        model = next(
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        )
    flags = cpu_flags()
    import torch  # here, not at the top: the runner and the report import this module and need no torch

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
