"""Distance to the limit: achieved GFLOP/s of onnxruntime fp32 and int8 on the MiniLM at seq 64, batch 32,
against this CPU's peak.

Formulas (printed with the results and written to BENCHMARKS.md):

    FLOPs per sequence ≈ 2 × P_matmul × seq + 4 × layers × seq² × hidden  (+ 2 × P_head, once per sequence)
        P_matmul = weights of the encoder's matrix multiplies = layers × (4 × hidden² + 2 × hidden × intermediate)
        (Q, K, V, output projections and the two feed-forward matrices; embeddings are look-ups, not matmuls)
        4 × layers × seq² × hidden = Q·Kᵀ and attention·V, 2 FLOPs per multiply-add
    fp32 peak = cores × GHz × 2 FMA units × 16 fp32 lanes (AVX-512) × 2 FLOPs per FMA
    int8 peak with AVX-512 VNNI = 4 × the fp32 peak (VPDPBUSD: 4 int8 multiply-adds per 32-bit lane)

Every sequence is padded to exactly `seq` tokens (real tweets, attention mask over the real ones): the encoder
computes on all `seq` positions, so the FLOP count is exact for the shapes run. Usage:

    python -m benchmarks.bench_limits [--model RUN_DIR | NAME@ALIAS] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModel, AutoTokenizer

from benchmarks.common import ROOT, cpu_flags, cpu_ghz, machine_info, write_result
from benchmarks.model import demo_model, resolve_model
from models.text import MINILM, TextAdapter, resolve_text_source
from tasks.export import export_onnx, optimise, quantise_int8, session

FMA_UNITS, FP32_LANES, INT8_FACTOR = 2, 16, 4


# --- formulas (pure) -----------------------------------------------------------------------------------------


def matmul_params(layers: int, hidden: int, intermediate: int) -> int:
    """Weights in the encoder's matrix multiplies: Q, K, V, O (hidden²) and the two FFN matrices per layer."""
    return layers * (4 * hidden * hidden + 2 * hidden * intermediate)


def flops_per_sequence(
    params_in_matmuls: int, layers: int, hidden: int, seq: int, head_params: int = 0
) -> dict[str, float]:
    dense = 2 * params_in_matmuls * seq
    attention = 4 * layers * seq * seq * hidden
    head = 2 * head_params
    return {"dense": dense, "attention": attention, "head": head, "total": dense + attention + head}


def peak_gflops(cores: int, ghz: float, fma_units: int = FMA_UNITS, lanes: int = FP32_LANES) -> dict[str, float]:
    fp32 = cores * ghz * fma_units * lanes * 2
    return {"fp32": fp32, "int8_vnni": INT8_FACTOR * fp32}


def cpu_identity(cpuinfo: str | None = None) -> dict[str, Any]:
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return {
        "vendor": fields.get("vendor_id", "?"),
        "family": fields.get("cpu family", "?"),
        "model": fields.get("model"),
    }


def datapath_note(identity: dict[str, Any]) -> str | None:
    """AMD Zen 4 (family 25 = 0x19, models 0x10-0x1f and 0x60-0x7f) runs AVX-512 on 256-bit units."""
    if identity["vendor"] != "AuthenticAMD" or identity["family"] != "25":
        return None
    try:
        model = int(identity["model"])
    except (TypeError, ValueError):
        return None
    if 0x10 <= model <= 0x1F or 0x60 <= model <= 0x7F or 0xA0 <= model <= 0xAF:
        return (
            f"this is AMD Zen 4 (family 25, model {model}): it executes each 512-bit FMA as two 256-bit halves, "
            "so its real fp32 peak is half the formula's (2 FMA × 8 lanes × 2 per cycle); int8 : fp32 stays 4×"
        )
    return None


# --- measurement ---------------------------------------------------------------------------------------------


def model_shape(run_dir: Path | None) -> dict[str, int]:
    """layers, hidden, intermediate from the run's encoder config (else the packaged MiniLM's)."""
    candidates = [run_dir / "model" / "encoder" / "config.json"] if run_dir else []
    candidates.append(Path(resolve_text_source(MINILM)) / "config.json")
    path = next(p for p in candidates if p.is_file())
    cfg = json.loads(path.read_text())
    return {
        "layers": cfg["num_hidden_layers"],
        "hidden": cfg["hidden_size"],
        "intermediate": cfg["intermediate_size"],
        "config": str(path),
    }


def count_linear_weights(shape: dict[str, Any]) -> int:
    """Cross-check of `matmul_params` on the real architecture (random weights, built from the config)."""
    model = AutoModel.from_config(AutoConfig.from_pretrained(Path(shape["config"]).parent))
    return sum(
        m.weight.numel() for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layer." in name
    )


def bundle_models(run_dir: Path | None, workdir: Path) -> tuple[dict[str, Path], str]:
    """fp32 and int8 ONNX files: the demo bundle's, or a fresh export of the packaged MiniLM via tasks.export."""
    if run_dir is not None:
        bundle = run_dir / "export" / "bundle"
        files = {"fp32": bundle / "model.onnx", "int8": bundle / "model.int8.onnx"}
        if all(p.is_file() for p in files.values()):
            return files, str(bundle)
    adapter = TextAdapter(max_length=64)
    model = adapter.build("minilm", 3).eval()
    sample = adapter.collate(adapter.encode(["a short example", "another, slightly longer example sentence"]))
    raw = export_onnx(model, adapter, sample, workdir / "raw.onnx", 18)
    fp32 = optimise(raw, workdir / "model.onnx", model)
    return {"fp32": fp32, "int8": quantise_int8(fp32, workdir / "model.int8.onnx")}, "fresh export (tasks.export)"


def fixed_inputs(tokenizer_json: Path | None, texts: list[str], batch: int, seq: int) -> dict[str, np.ndarray]:
    """`batch` real tweets, truncated / padded to exactly `seq` tokens."""
    if tokenizer_json is None or not tokenizer_json.is_file():
        tokenizer = AutoTokenizer.from_pretrained(resolve_text_source(MINILM)).backend_tokenizer
    else:
        tokenizer = Tokenizer.from_file(str(tokenizer_json))
    tokenizer.enable_truncation(seq)
    tokenizer.enable_padding(length=seq, pad_id=0)
    enc = tokenizer.encode_batch(texts[:batch])
    return {
        "input_ids": np.asarray([e.ids for e in enc], dtype=np.int64),
        "attention_mask": np.asarray([e.attention_mask for e in enc], dtype=np.int64),
    }


def time_session(path: Path, feeds: dict[str, np.ndarray], threads: int, runs: int, warmup: int = 3) -> list[float]:
    sess = session(path, threads)
    names = {i.name for i in sess.get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in names}
    for _ in range(warmup):
        sess.run(["logits"], feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(["logits"], feeds)
        times.append(time.perf_counter() - start)
    return times


def run(run_dir: Path | None, batch: int, seq: int, runs: int, threads: int | None) -> dict[str, Any]:
    threads = threads or os.cpu_count() or 1
    shape = model_shape(run_dir)
    p_matmul = matmul_params(shape["layers"], shape["hidden"], shape["intermediate"])
    counted = count_linear_weights(shape)
    head = shape["hidden"] * 3
    per_seq = flops_per_sequence(p_matmul, shape["layers"], shape["hidden"], seq, head)
    per_batch = per_seq["total"] * batch
    ghz, ghz_source = cpu_ghz()
    cores = os.cpu_count() or 1
    peak = peak_gflops(cores, ghz)
    identity = cpu_identity()
    flags = cpu_flags()
    texts = [
        json.loads(line)["text"] for line in (ROOT / "data/tweets/test.jsonl").read_text().splitlines()[: batch * 8]
    ]
    texts = sorted(texts, key=len, reverse=True)  # the longest ones: fewer pad positions (compute is the same)
    with tempfile.TemporaryDirectory(prefix="bench-limits-") as tmp:
        files, source = bundle_models(run_dir, Path(tmp))
        feeds = fixed_inputs(files["fp32"].parent / "tokenizer.json", texts, batch, seq)
        results = {}
        for name, path in files.items():
            times = time_session(path, feeds, threads, runs)
            median = statistics.median(times)
            gflops = per_batch / median / 1e9
            ref = peak["fp32"] if name == "fp32" else peak["int8_vnni"]
            results[name] = {
                "median_ms": 1000 * median,
                "sequences_per_s": batch / median,
                "gflops": gflops,
                "peak_gflops": ref,
                "fraction_of_peak": gflops / ref,
            }
    note = datapath_note(identity)
    if note:
        for r in results.values():
            r["fraction_of_256bit_peak"] = 2 * r["fraction_of_peak"]
    return {
        "results": results,
        "model": {
            **{k: v for k, v in shape.items() if k != "config"},
            "params_in_matmuls": p_matmul,
            "params_in_matmuls_counted": counted,
            "head_params": head,
        },
        "flops": {"per_sequence": per_seq, "per_batch": per_batch},
        "peak": {
            "cores": cores,
            "ghz": ghz,
            "ghz_source": ghz_source,
            "fma_units": FMA_UNITS,
            "fp32_lanes": FP32_LANES,
            **peak,
            "avx512f": "avx512f" in flags,
            "avx512_vnni": "avx512_vnni" in flags,
            "cpu": identity,
            "datapath_note": note,
        },
        "formulas": {
            "flops_per_sequence": "2 × P_matmul × seq + 4 × layers × seq² × hidden + 2 × P_head",
            "P_matmul": "layers × (4 × hidden² + 2 × hidden × intermediate)",
            "fp32_peak": "cores × GHz × 2 FMA units × 16 fp32 lanes × 2",
            "int8_peak": "4 × fp32 peak (AVX-512 VNNI)",
        },
        "setup": {"batch": batch, "seq": seq, "runs": runs, "threads": threads, "onnx": source},
    }


def print_table(r: dict[str, Any]) -> None:
    m, f, p = r["model"], r["flops"], r["peak"]
    print(f"\ndistance to the limit — {r['setup']}")
    print(
        f"P_matmul = {m['layers']} × (4 × {m['hidden']}² + 2 × {m['hidden']} × {m['intermediate']}) = "
        f"{m['params_in_matmuls']:,} (counted nn.Linear weights: {m['params_in_matmuls_counted']:,})"
    )
    print(f"FLOPs/sequence = {f['per_sequence']['total'] / 1e9:.3f} G ; per batch {f['per_batch'] / 1e9:.2f} G")
    print(
        f"peak: {p['cores']} cores × {p['ghz']:.3f} GHz ({p['ghz_source']}) × {p['fma_units']} × {p['fp32_lanes']} × 2"
        f" = {p['fp32']:.1f} GFLOP/s fp32, {p['int8_vnni']:.1f} GOP/s int8 (VNNI)"
    )
    for name, x in r["results"].items():
        print(
            f"  {name}: {x['median_ms']:.1f} ms/batch, {x['gflops']:.1f} GFLOP/s = "
            f"{100 * x['fraction_of_peak']:.1f}% of {x['peak_gflops']:.0f}"
        )
    if p["datapath_note"]:
        print("note:", p["datapath_note"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        "--run-dir",
        default=None,
        help="RUN_DIR or NAME@ALIAS (default: the demo's run, else export one)",
    )
    parser.add_argument("--quick", action="store_true", help="5 timed runs instead of 20")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: cores)")
    args = parser.parse_args(argv)
    if args.model is not None:
        run_dir: Path | None = resolve_model(args.model).require_run_dir("bench_limits")
    else:
        try:
            run_dir = demo_model().run_dir
        except SystemExit as missing:
            print(f"{missing}; measuring a fresh export of the packaged MiniLM instead")
            run_dir = None
    results = run(run_dir, 32, 64, 5 if args.quick else 20, args.threads) | {"machine": machine_info()}
    print_table(results)
    print(f"wrote {write_result('limits', results)}")
    return results


if __name__ == "__main__":
    main()
