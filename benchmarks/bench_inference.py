"""Inference side by side in one run: torch eager fp32 vs onnxruntime fp32 vs onnxruntime int8.

Same model (the demo's fine-tuned MiniLM, or the run `--model` names), same real test tweets, dynamic padding,
batch 1 and 32.
Prints a table and writes JSON to benchmarks/results/. Usage:

    python -m benchmarks.bench_inference [--model RUN_DIR | NAME@ALIAS] [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transflow_edge.bundle import verify_bundle

from benchmarks.common import machine_info, write_result
from benchmarks.model import resolve_model
from models.adapters import load_model_dir
from models.trainer import scores
from runconfig import RunConfig
from tasks.data import load_dataset
from tasks.export import session


def time_calls(fn: Any, batches: list[Any], warmup: int = 3) -> list[float]:
    for batch in batches[:warmup]:
        fn(batch)
    times = []
    for batch in batches:
        start = time.perf_counter()
        fn(batch)
        times.append(time.perf_counter() - start)
    return times


def summarise(times: list[float], batch_size: int) -> dict[str, float]:
    ms = sorted(t * 1000 for t in times)
    return {
        "median_ms": statistics.median(ms),
        "p90_ms": ms[int(0.9 * (len(ms) - 1))],
        "throughput_per_s": batch_size * len(ms) / (sum(ms) / 1000),
    }


def run(run_dir: Path, n_batch1: int, n_batch32: int, accuracy_limit: int | None) -> dict[str, Any]:
    threads = torch.get_num_threads()
    cfg = RunConfig.model_validate(json.loads((run_dir / "config.json").read_text()))
    adapter, model, _ = load_model_dir(run_dir / "model")
    bundle = verify_bundle(run_dir / "export" / "bundle")
    test = load_dataset(cfg.data, seed=cfg.training.seed).test
    mixed = np.random.default_rng(0).permutation(len(test.items))  # split files are grouped by label
    texts, labels = [test.items[i] for i in mixed], np.asarray(test.labels)[mixed]
    sessions = {"onnx_fp32": session(bundle.path("model.onnx"), threads)}
    if "model.int8.onnx" in bundle.manifest["files"]:
        sessions["onnx_int8"] = session(bundle.path("model.int8.onnx"), threads)

    def feeds(chunk: list[str]) -> dict[str, torch.Tensor]:
        return adapter.collate(adapter.encode(chunk))

    runners = {"torch_eager_fp32": lambda b: model(**b)}
    for name, sess in sessions.items():
        runners[name] = lambda b, s=sess: s.run(["logits"], {k: v.numpy() for k, v in b.items()})
    results: dict[str, Any] = {}
    with torch.inference_mode():
        for batch_size, n in ((1, n_batch1), (32, n_batch32)):
            chunks = [feeds(texts[i : i + batch_size]) for i in range(0, n * batch_size, batch_size)]
            row = {name: summarise(time_calls(fn, chunks), batch_size) for name, fn in runners.items()}
            base = row["torch_eager_fp32"]["median_ms"]
            for name in runners:
                row[name]["speedup_vs_torch"] = base / row[name]["median_ms"]
            results[f"batch_{batch_size}"] = row
        subset = slice(0, accuracy_limit)
        order = sorted(range(len(texts[subset])), key=lambda i: len(texts[i]))
        accuracy = {}
        for name, fn in runners.items():
            logits = [
                np.asarray(_logits(fn(feeds([texts[i] for i in order[j : j + 64]])))) for j in range(0, len(order), 64)
            ]
            accuracy[name] = scores(labels[subset][order], np.concatenate(logits))
    results["accuracy"] = accuracy
    if "onnx_int8" in accuracy:
        results["int8_macro_f1_delta_pt"] = 100 * (
            accuracy["onnx_fp32"]["macro_f1"] - accuracy["onnx_int8"]["macro_f1"]
        )
    results["setup"] = {
        "model": f"{bundle.manifest['name']} v{bundle.manifest['version']}",
        "test_examples": len(texts[subset]),
        "threads": threads,
        "max_length": adapter.max_length,
        "padding": "dynamic (longest in batch)",
    }
    return results


def _logits(out: Any) -> Any:
    return out[0] if isinstance(out, list) else out.numpy()


def print_table(results: dict[str, Any]) -> None:
    print(f"\ninference on {platform.processor() or platform.machine()} — {results['setup']}")
    print(f"{'batch':>6} {'runtime':<18} {'median ms':>10} {'p90 ms':>8} {'items/s':>9} {'× torch':>8}")
    for key in ("batch_1", "batch_32"):
        for name, r in results[key].items():
            print(
                f"{key[6:]:>6} {name:<18} {r['median_ms']:>10.2f} {r['p90_ms']:>8.2f} "
                f"{r['throughput_per_s']:>9.1f} {r['speedup_vs_torch']:>8.2f}"
            )
    for name, m in results["accuracy"].items():
        print(f"accuracy {name:<18} acc {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}")
    if "int8_macro_f1_delta_pt" in results:
        print(f"int8 macro-F1 drop vs fp32: {results['int8_macro_f1_delta_pt']:.2f} pt")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        "--run-dir",
        default=None,
        help="RUN_DIR or NAME@ALIAS (default: the demo's run)",
    )
    parser.add_argument("--quick", action="store_true", help="Fewer timed calls and a 500-example accuracy subset")
    args = parser.parse_args(argv)
    run_dir = resolve_model(args.model).require_run_dir("bench_inference")
    n1, n32, limit = (50, 8, 500) if args.quick else (200, 30, None)
    results = run(run_dir, n1, n32, limit) | {"machine": machine_info()}
    print_table(results)
    print(f"wrote {write_result('inference', results)}")
    return results


if __name__ == "__main__":
    main()
