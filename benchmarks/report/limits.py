"""The limits benchmark's section: achieved GFLOP/s against the CPU's peak, with the formulas written out."""

from __future__ import annotations

from typing import Any

from benchmarks.report.markdown import fmt, md_table

TITLE = "Distance to the limit (MiniLM, seq 64, batch 32)"


def section(r: dict[str, Any]) -> str:
    m, f, p = r["model"], r["flops"], r["peak"]
    half = any("fraction_of_256bit_peak" in x for x in r["results"].values())
    headers = ["path", "ms / batch of 32", "sequences/s", "achieved GFLOP/s", "peak (formula)", "% of peak"]
    if half:
        headers.append("% of 256-bit-datapath peak")
    rows = []
    for name, x in r["results"].items():
        row = [
            f"onnxruntime {name}",
            x["median_ms"],
            x["sequences_per_s"],
            x["gflops"],
            x["peak_gflops"],
            fmt(100 * x["fraction_of_peak"], 1),
        ]
        if half:
            row.append(fmt(100 * x.get("fraction_of_256bit_peak", float("nan")), 1))
        rows.append(row)
    out = [
        md_table(headers, rows),
        "Formulas:\n\n"
        f"- FLOPs per sequence ≈ 2 × P_matmul × seq + 4 × layers × seq² × hidden (+ 2 × P_head once) = "
        f"2 × {m['params_in_matmuls']:,} × {r['setup']['seq']} + 4 × {m['layers']} × {r['setup']['seq']}² × "
        f"{m['hidden']} + 2 × {m['head_params']:,} = {fmt(f['per_sequence']['total'] / 1e9, 3)} GFLOP "
        f"({fmt(f['per_batch'] / 1e9)} GFLOP per batch of {r['setup']['batch']})\n"
        f"- P_matmul = layers × (4 × hidden² + 2 × hidden × intermediate) = {m['layers']} × (4 × {m['hidden']}² + "
        f"2 × {m['hidden']} × {m['intermediate']}) = {m['params_in_matmuls']:,} (nn.Linear weights counted in the "
        f"encoder layers: {m['params_in_matmuls_counted']:,}); embeddings are look-ups, not matmuls\n"
        f"- fp32 peak = cores × GHz × 2 FMA units × 16 fp32 lanes (AVX-512) × 2 = {p['cores']} × {fmt(p['ghz'], 3)} "
        f"× 2 × 16 × 2 = {fmt(p['fp32'], 1)} GFLOP/s; GHz from {p['ghz_source']}\n"
        f"- int8 peak with AVX-512 VNNI = 4 × fp32 peak = {fmt(p['int8_vnni'], 1)} GOP/s "
        f"(VNNI on this CPU: {fmt(p['avx512_vnni'])})",
    ]
    if p.get("datapath_note"):
        out.append(f"Note: {p['datapath_note']}.")
    out.append(
        "Every sequence is padded to exactly 64 tokens, so the FLOP count is exact for what runs. Int8 here is "
        "onnxruntime's dynamic quantisation: activations are quantised at run time, and attention, softmax, "
        "LayerNorm and GELU stay fp32, so its ceiling is well below the VNNI peak."
    )
    return "\n\n".join(out)
