"""Speed and size for the candidate report: p50/p95 latency at batch 1 and 32 of torch eager, ONNX fp32 and ONNX
int8 as the bundle ships them, the file sizes, and the CPU's instruction set (an int8 speed-up depends on VNNI)."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.backbone import Adapter, TransferModel

# What decides ONNX Runtime's int8 and fp32 kernels on x86 (and their Arm counterparts)
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
             "avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "sve", "i8mm")  # fmt: skip
BATCHES = (1, 32)
REPEATS = {1: 30, 32: 6}  # enough for a stable p50 and an indicative p95 in ~1 s per runtime


def cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """Model name, logical cores and the instruction-set flags that matter for inference."""
    name, flags = platform.processor() or platform.machine(), set()
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines()[:200]:
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                name = value.strip()
            if key.strip() in ("flags", "Features"):
                flags |= set(value.split())
    return {"model": name, "cores": os.cpu_count(), "isa": [f for f in ISA_FLAGS if f in flags],
            "machine": platform.machine()}  # fmt: skip


def isa_label(cpu: dict[str, Any]) -> str:
    """The flags printed beside every latency: 'AMD EPYC · 2 cores · avx2 fma (no AVX-512, no VNNI)'."""
    isa = cpu.get("isa", [])
    missing = [label for label, flag in (("AVX-512", "avx512f"), ("VNNI", "avx512_vnni")) if flag not in isa]
    if "avx_vnni" in isa and "VNNI" in missing:
        missing.remove("VNNI")
    extra = f" (no {', no '.join(missing)})" if missing and cpu.get("machine") in ("x86_64", "AMD64") else ""
    return f"{cpu.get('model')} · {cpu.get('cores')} cores · {' '.join(isa) or 'no flags read'}{extra}"


def percentiles(run: Callable[[], Any], repeats: int, warmup: int = 2) -> dict[str, float]:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(1000 * (time.perf_counter() - started))
    return {"p50_ms": round(float(np.percentile(times, 50)), 3), "p95_ms": round(float(np.percentile(times, 95)), 3),
            "repeats": repeats}  # fmt: skip


def sample_batches(adapter: Adapter, items: list[Any]) -> dict[int, dict[str, torch.Tensor]]:
    """Real test inputs: the first example alone, and the first 32 (recycled if the split is smaller)."""
    return {b: adapter.collate(adapter.encode([items[i % len(items)] for i in range(b)]), False) for b in BATCHES}


def measure_latency(
    model: TransferModel | None, bundle_dir: Path, adapter: Adapter, items: list[Any], threads: int | None = None
) -> list[dict[str, Any]]:
    """One row per runtime × batch size. ONNX runs on the bundle's own files with the session settings the edge
    uses; int8 only when the bundle ships it. Torch eager runs the model in the same process, no compile."""
    from tasks.export import session  # the edge's session settings (graph optimisations, CPU provider)

    feeds = sample_batches(adapter, items)
    rows = []
    runtimes: list[tuple[str, Callable[[dict[str, torch.Tensor]], Any]]] = []
    if model is not None:
        model = model.cpu().eval()

        def eager(batch: dict[str, torch.Tensor]) -> Any:
            with torch.inference_mode():
                return model(**batch)

        runtimes.append(("torch eager", eager))
    for label, name in (("ONNX fp32", "model.onnx"), ("ONNX int8", "model.int8.onnx")):
        if (bundle_dir / name).is_file():
            sess = session(bundle_dir / name, threads)
            runtimes.append((label, lambda batch, s=sess: s.run(["logits"], {k: v.numpy() for k, v in batch.items()})))
    for label, run in runtimes:
        for b in BATCHES:
            rows.append({"runtime": label, "batch": b, **percentiles(lambda r=run, x=feeds[b]: r(x), REPEATS[b])})
    return rows


def file_sizes(bundle_dir: Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    rows = [{"file": name, "bytes": int(entry["size"])} for name, entry in manifest.get("files", {}).items()]
    rows.append({"file": "manifest.json", "bytes": (bundle_dir / "manifest.json").stat().st_size})
    return sorted(rows, key=lambda r: -r["bytes"])
