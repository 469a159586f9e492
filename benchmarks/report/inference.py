"""The inference benchmark's section: latency and throughput per runtime and batch size, accuracy per runtime."""

from __future__ import annotations

from typing import Any

from benchmarks.report.markdown import fmt, md_table

TITLE = "Inference: torch vs ONNX fp32 vs ONNX int8"


def section(r: dict[str, Any]) -> str:
    rows = [
        [key.removeprefix("batch_"), runtime, x["median_ms"], x["p90_ms"], x["throughput_per_s"], x["speedup_vs_torch"]]
        for key in ("batch_1", "batch_32")
        for runtime, x in r.get(key, {}).items()
    ]
    out = [md_table(["batch", "runtime", "median ms", "p90 ms", "items/s", "× torch"], rows)]
    acc = r.get("accuracy", {})
    if acc:
        out.append(
            md_table(["runtime", "accuracy", "macro-F1"], [[k, v["accuracy"], v["macro_f1"]] for k, v in acc.items()])
        )
    if "int8_macro_f1_delta_pt" in r:
        out.append(f"int8 macro-F1 drop vs fp32: {fmt(r['int8_macro_f1_delta_pt'])} pt. Setup: {fmt(r.get('setup'))}.")
    return "\n\n".join(out)
