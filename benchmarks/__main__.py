"""The benchmark suite: one entry point that runs every benchmark and writes one results file and BENCHMARKS.md.

    python -m benchmarks run [--quick] [--only NAME …] [--skip NAME …]   (a partial run updates the day's file)
    python -m benchmarks render benchmarks/results/<machine>-<date>.json     (re-write BENCHMARKS.md only)

Each benchmark runs in its own Python process (`python -m benchmarks child MODULE OUT.json ARGS…`, which calls the
module's `main(argv)`), one after the other, so no benchmark inherits another's threads, allocator state, Prefect
server or monkeypatches, and one that crashes does not take the others down. The merged results go to
`benchmarks/results/<machine>-<date>.json` (`…-quick.json` for `--quick`), and BENCHMARKS.md at the repository root
gets a table per benchmark with each goal marked met / not met. Text between the notes markers of an existing
BENCHMARKS.md is kept.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import importlib.util
import json
import math
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MARKDOWN = ROOT / "BENCHMARKS.md"
NOTES_BEGIN, NOTES_END = "<!-- notes:begin (kept by the runner) -->", "<!-- notes:end -->"
BUDGET_S = {"quick": 4 * 60, "full": 15 * 60}
EDGE_HOOK = "benchmarks.bench_edge"  # written separately; run when the module exists, reported as skipped if not

# name → (module, title); the order they run in
BENCHMARKS: dict[str, tuple[str, str]] = {
    "inference": ("benchmarks.bench_inference", "Inference: torch vs ONNX fp32 vs ONNX int8"),
    "probe": ("benchmarks.bench_probe", "Probe stage: cached features vs frozen backbone every epoch"),
    "edge": (EDGE_HOOK, "Edge server"),
    "training": ("benchmarks.bench_training", "Training throughput"),
    "pipeline": ("benchmarks.bench_pipeline", "Orchestration overhead (retraining flow)"),
    "limits": ("benchmarks.bench_limits", "Distance to the limit (MiniLM, seq 64, batch 32)"),
}


# --- running -------------------------------------------------------------------------------------------------


def module_exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def child_env(prefect_home: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PREFECT_HOME", prefect_home)  # a throwaway Prefect database, never the user's ~/.prefect
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.setdefault("DO_NOT_TRACK", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run_one(
    name: str, module: str, argv: list[str], timeout: float, prefect_home: str | None = None
) -> tuple[dict[str, Any], float]:
    """Run one benchmark's `main(argv)` in a fresh process; its result dict, or {'error'|'skipped': why}."""
    if not module_exists(module):
        return {"skipped": f"{module.replace('.', '/')}.py is not there yet (hook: `{module}.main(argv)`)"}, 0.0
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        out = Path(tmp) / "result.json"
        env = child_env(prefect_home or str(Path(tmp) / "prefect-home"))
        cmd = [sys.executable, "-m", "benchmarks", "child", module, str(out), "--", *argv]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout, check=False)
            code: int | str = proc.returncode
        except subprocess.TimeoutExpired:
            code = f"timed out after {timeout:.0f}s"
        seconds = time.perf_counter() - start
        if out.is_file():
            return json.loads(out.read_text()), seconds
        return {"error": f"exit {code}, no result written"}, seconds


def child(module: str, out: Path, argv: list[str]) -> int:
    """Inside the benchmark's own process: call `main(argv)`, write what it returns (or why it failed)."""
    code = 0
    try:
        result = importlib.import_module(module).main(argv)
        if not isinstance(result, dict):
            result = {"note": f"{module}.main returned {type(result).__name__}, not a dict of results"}
    except SystemExit as exc:  # e.g. "no exported run under runs/: run `make demo` first"
        if exc.code in (0, None):
            result = {"note": f"{module}.main exited without results"}
        else:
            result, code = {"error": str(exc.code)}, 1
    except Exception as exc:
        tail = "".join(traceback.format_exception(exc)[-6:])
        result, code = {"error": f"{type(exc).__name__}: {exc}", "traceback": tail}, 1
        print(tail, file=sys.stderr)
    out.write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
    return code


def _json_default(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def selected(only: Sequence[str] | None, skip: Sequence[str]) -> list[str]:
    names = list(only) if only else list(BENCHMARKS)
    unknown = sorted((set(names) | set(skip)) - set(BENCHMARKS))
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    return [n for n in BENCHMARKS if n in names and n not in skip]


def merge_results(
    machine: dict[str, Any],
    outcomes: dict[str, dict[str, Any]],
    seconds: dict[str, float],
    quick: bool,
    when: dt.datetime,
) -> dict[str, Any]:
    """One document: the machine once at the top, each benchmark's result without its own copy of it."""
    benchmarks, mismatched = {}, []
    for name, result in outcomes.items():
        result = dict(result)
        theirs = result.pop("machine", None)
        if theirs and any(theirs.get(k) != machine.get(k) for k in ("cpu", "cores", "torch")):
            mismatched.append(name)
        benchmarks[name] = result
    return {
        "machine": machine,
        "date": when.date().isoformat(),
        "started": when.isoformat(timespec="seconds"),
        "ran": {name: when.isoformat(timespec="seconds") for name in outcomes},
        "mode": "quick" if quick else "full",
        "seconds": {**{k: round(v, 1) for k, v in seconds.items()}, "total": round(sum(seconds.values()), 1)},
        "budget_s": BUDGET_S["quick" if quick else "full"],
        "machine_mismatch": mismatched,
        "benchmarks": benchmarks,
    }


def combine(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """A partial run (--only / --skip) on top of the same day's results file: the new results replace the old ones
    of the same benchmarks, the others are kept (listed in `kept_from_earlier_run`; `ran` says when each ran)."""
    if old.get("mode") != new["mode"] or old.get("machine", {}).get("cpu") != new["machine"].get("cpu"):
        return new
    names = [n for n in BENCHMARKS if n in old["benchmarks"] or n in new["benchmarks"]]
    names += [n for n in [*old["benchmarks"], *new["benchmarks"]] if n not in names]
    names = list(dict.fromkeys(names))
    kept = [n for n in names if n not in new["benchmarks"]]
    seconds = {n: (new if n in new["benchmarks"] else old)["seconds"].get(n, 0.0) for n in names}
    ran = {n: old.get("ran", {}).get(n, old.get("started")) for n in old["benchmarks"]} | new.get("ran", {})
    return {
        **new,
        "benchmarks": {n: new["benchmarks"].get(n, old["benchmarks"].get(n)) for n in names},
        "seconds": {**seconds, "total": round(sum(seconds.values()), 1)},
        "ran": {n: ran.get(n) for n in names},
        "kept_from_earlier_run": kept,
    }


def machine_slug(hostname: str | None = None) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", (hostname or socket.gethostname())[:20]).strip("-") or "machine"


def results_path(merged: dict[str, Any], hostname: str | None = None) -> Path:
    suffix = "-quick" if merged["mode"] == "quick" else ""
    return RESULTS / f"{machine_slug(hostname)}-{merged['date']}{suffix}.json"


def run_suite(quick: bool, names: list[str], timeout: float) -> dict[str, Any]:
    from benchmarks.common import machine_info

    when = dt.datetime.now()
    outcomes, seconds = {}, {}
    for name in names:
        module, title = BENCHMARKS[name]
        print(f"\n=== {name}: {title} ===", flush=True)
        outcomes[name], seconds[name] = run_one(name, module, ["--quick"] if quick else [], timeout)
        status = next((k for k in ("error", "skipped") if k in outcomes[name]), "ok")
        print(f"=== {name}: {status} in {seconds[name]:.0f}s ===", flush=True)
    machine = machine_info() | cpu_extra()
    return merge_results(machine, outcomes, seconds, quick, when)


def cpu_extra() -> dict[str, Any]:
    from benchmarks.bench_limits import cpu_ghz

    ghz, source = cpu_ghz()
    return {"ghz": ghz, "ghz_source": source}


# --- rendering (pure) ----------------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if value != 0 and abs(value) < 10 ** (-digits):
            return f"{value:.2g}"
        return f"{value:,.{digits}f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def status(met: bool | None) -> str:
    return "–" if met is None else "**met**" if met else "**not met**"


def goal_rows(name: str, result: dict[str, Any]) -> list[list[str]]:
    """Every goal a benchmark reports (`goals: {key: {target, value, met}}`), plus the probe's own."""
    rows = []
    for key, g in (result.get("goals") or {}).items():
        value, target = g.get("value", result.get("ratios", {}).get(key)), str(g.get("target", "?"))
        unit = "%" if target.endswith("%") else "×" if target.endswith("×") else ""
        rows.append([name, key, target, fmt(value, 3) + unit, status(g.get("met"))])
    if name == "edge":
        rows += [[name, goal, target, value, status(met)] for goal, target, value, met in edge_goals(result)]
    if name == "probe" and "speedup_per_epoch_after_first" in result:
        v = result["speedup_per_epoch_after_first"]
        rows.append([name, "cached vs naive, per epoch after the first", "≥ 5×", fmt(v, 1) + "×", status(v >= 5)])
    return rows


def section_inference(r: dict[str, Any]) -> str:
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


def section_probe(r: dict[str, Any]) -> str:
    rows = [
        ["train examples", r.get("train_examples")],
        ["epochs", r.get("epochs")],
        ["feature extraction (once), s", r.get("feature_extraction_s")],
        ["cached probe, s per epoch", r.get("cached_epoch_s")],
        ["naive probe (backbone every epoch), s per epoch", r.get("naive_epoch_s")],
        ["speed-up per epoch after the first", r.get("speedup_per_epoch_after_first")],
        ["speed-up over the whole stage", r.get("speedup_whole_stage")],
    ]
    return md_table(["", "value"], rows)


def section_training(r: dict[str, Any]) -> str:
    loops = r.get("loops", {})
    out = [
        md_table(
            ["loop", "samples/s (best of rounds)", "per round", "median step s", "optimizer", "threads"],
            [
                [
                    name,
                    x["samples_per_s"],
                    ", ".join(fmt(v) for v in x.get("samples_per_s_rounds", [])),
                    x["median_step_s"],
                    x.get("optimizer", "–"),
                    ", ".join(str(t) for t in x.get("threads", [])),
                ]
                for name, x in loops.items()
            ],
        )
    ]
    goals = r.get("goals", {})
    out.append(
        md_table(
            ["ratio", "value", "goal", "status"],
            [
                [k, fmt(v, 3) + "×", goals.get(k, {}).get("target", "–"), status(goals.get(k, {}).get("met"))]
                for k, v in r.get("ratios", {}).items()
            ],
        )
    )
    pad = r.get("padding")
    if pad:
        out.append(
            "Padding on these tweets (tokens per example the encoder computes on): "
            f"real {fmt(pad['mean_tokens'], 1)}, dynamic (longest in batch) {fmt(pad['dynamic_padded_tokens'], 1)} "
            f"({fmt(100 * pad['dynamic_real_fraction'], 0)}% real), fixed {fmt(pad['fixed_padded_tokens'], 0)} "
            f"({fmt(100 * pad['fixed_real_fraction'], 0)}% real); length-grouped batches (estimate, sorting windows "
            f"of 50 batches) would compute on {fmt(pad.get('grouped_padded_tokens'), 1)} "
            f"({fmt(100 * pad.get('grouped_real_fraction', float('nan')), 0)}% real)."
        )
    setup = r.get("setup")
    if setup:
        out.append("Setup: " + ", ".join(f"{k} {fmt(v)}" for k, v in setup.items()) + ".")
    return "\n\n".join(out)


def section_profile(r: dict[str, Any]) -> str:
    p = r.get("profile")
    if not p:
        return ""
    out = [
        f"{p['steps']} steps of the real `fit` after the warm-up ({fmt(p['step_s'])} s/step), phases timed by wrapping "
        "what `fit` calls:",
        md_table(["phase", "% of step"], [[k, fmt(v, 1)] for k, v in p["phases_pct"].items()]),
        "torch.profiler, top operators by self CPU time:",
        md_table(
            ["operator", "% self CPU", "calls"],
            [[o["op"], fmt(o["self_cpu_pct"], 1), o["calls"]] for o in p["top_ops"]],
        ),
        "One AdamW step over the whole model on the same gradients:",
        md_table(["AdamW implementation", "ms"], [[k, v] for k, v in p["optimizer_step_ms"].items()]),
    ]
    return "\n\n".join(out)


def section_pipeline(r: dict[str, Any]) -> str:
    s, p = r["split_s"], r["split_pct"]
    labels = {
        "prefect_server_start": "Prefect: temporary server start",
        "prefect_flow_engine": "Prefect: flow engine (flow wall − flow function − server start)",
        "prefect_task_engine": "Prefect: task engine (Σ task call − task function)",
        "mlflow": "MLflow (every `Tracker` call, incl. import and store set-up)",
        "dvc": "DVC check (`verify_data`: re-hash `data/`)",
        "compute": "compute (training, evaluation, export, glue)",
    }
    out = [
        md_table(
            ["part", "seconds", "% of wall"],
            [[labels[k], s[k], fmt(p[k + "_pct"], 1)] for k in labels] + [["**end to end**", s["wall"], "100"]],
        )
    ]
    server = r.get("server", {})
    lines = [
        f"Prefect + MLflow + DVC = **{fmt(p['overhead_pct'], 1)}%** of the end-to-end wall time; "
        f"{fmt(p['overhead_without_server_start_pct'], 1)}% without the temporary server's start "
        f"({fmt(server.get('cold_start_s'))} s on a fresh Prefect database"
    ]
    if server.get("warm_start_s") is not None:
        lines.append(f"; {fmt(server['warm_start_s'])} s when the database exists")
    lines.append(f"). The server process used {fmt(server.get('cpu_s'))} CPU-seconds, on the same cores as training.")
    store = r.get("mlflow_store")
    if store and "overhead_warm_pct" in p:
        lines.append(
            f" On a machine that ran the flow before (Prefect database and MLflow store exist: warm server start, no "
            f"store creation, which took {fmt(store['creation_s'])} s here) the share is "
            f"**{fmt(p['overhead_warm_pct'], 1)}%**."
        )
    out.append("".join(lines))
    demo = r.get("demo", {})
    if "overhead_pct" in demo:
        out.append(
            f"Demo-sized run, extrapolated (this run's overhead, which is the same tasks and MLflow calls, over the "
            f"demo's wall time from {demo['source']}): {fmt(demo['overhead_s'])} s of {fmt(demo['demo_wall_s'])} s = "
            f"**{fmt(demo['overhead_pct'], 1)}%** ({fmt(demo['overhead_without_server_start_pct'], 1)}% without the "
            f"server start; {fmt(demo.get('overhead_warm_pct'), 1)}% on a machine that ran the flow before)."
        )
    else:
        out.append(f"Demo-sized run: not extrapolated — {demo.get('source', 'no demo summary')}.")
    out.append(
        md_table(
            ["task", "calls", "in the function, s", "of which MLflow, s", "of which DVC, s", "Prefect around it, s"],
            [
                [t["task"], t["calls"], t["fn_s"], t["mlflow_s"], t["dvc_s"], fmt(t["prefect_s"], 3)]
                for t in r["per_task"]
            ],
        )
    )
    out.append(
        md_table(["MLflow call", "n", "seconds"], [[m["call"], m["n"], m["seconds"]] for m in r["mlflow_calls"]])
    )
    out.append(
        f"The first MLflow call ({fmt(r.get('mlflow_first_call_s'))} s) includes importing mlflow and creating the "
        "run's fresh sqlite store; `log_onnx` re-serialises the ONNX model in MLflow's onnx flavour."
    )
    lg = r["step_logging"]
    out.append(
        f"Per-step metric logging: one `Tracker.log_metrics` call with one demo epoch of per-step points ({lg['rows']} "
        f"points, one per step — `fit` keeps one per 10 steps) took {fmt(1000 * lg['seconds'], 1)} ms, against "
        f"{lg['rows']} steps × {fmt(lg['step_s'], 3)} s (the fastest encoder stage of this run) = "
        f"**{fmt(lg['pct_of_step_time'], 3)}%** of step time. In the flow itself: {r['flow_log_metrics']['calls']} "
        f"`log_metrics` calls, {r['flow_log_metrics']['rows']} points, {fmt(r['flow_log_metrics']['seconds'])} s."
    )
    setup = r.get("setup", {})
    overrides = ", ".join(setup.get("overrides") or []) or "no overrides"
    out.append(f"Setup: the real flow on `{fmt(setup.get('config'))}` ({overrides}; temp MLflow store and output dir).")
    return "\n\n".join(out)


def section_limits(r: dict[str, Any]) -> str:
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


def section_edge(r: dict[str, Any]) -> str:
    """benchmarks/bench_edge.py's result: latency / throughput per concurrency, server overhead, swap under load."""
    server, ratios = r["server"], r["ratios"]
    levels = sorted({k for runs in server.values() for k in runs}, key=lambda c: int(c.lstrip("c")))
    rows = []
    for c in levels:
        b, u = server.get("batched", {}).get(c, {}), server.get("unbatched", {}).get(c, {})
        rows.append(
            [
                c.lstrip("c"),
                b.get("p50_ms"),
                b.get("p99_ms"),
                b.get("throughput_per_s"),
                b.get("mean_batch"),
                u.get("p50_ms"),
                u.get("p99_ms"),
                u.get("throughput_per_s"),
                ratios.get(f"throughput_batched_over_unbatched_{c}"),
            ]
        )
    headers = [
        "clients",
        "batched p50 ms",
        "p99 ms",
        "req/s",
        "mean batch",
        "unbatched p50 ms",
        "p99 ms",
        "req/s",
        "batched ÷ unbatched req/s",
    ]
    out = [md_table(headers, rows)]
    bare = r.get("bare", {})
    out.append(
        f"Bare `InferenceSession.run` (same preprocessing, one text): p50 {fmt(bare.get('p50_ms'))} ms. "
        "Server overhead "
        f"at one client, p50: unbatched {fmt(ratios.get('overhead_p50_ms_unbatched_c1'))} ms, batched "
        f"{fmt(ratios.get('overhead_p50_ms_batched_c1'))} ms (inside the server: "
        f"{fmt(ratios.get('overhead_p50_ms_unbatched_c1_server_side'))} / "
        f"{fmt(ratios.get('overhead_p50_ms_batched_c1_server_side'))} ms)."
    )
    swap = r.get("swap", {})
    if swap:
        out.append(
            f"Bundle swap under load (upload, rollback, rollback): {fmt(swap.get('requests'))} requests, "
            f"{fmt(swap.get('failed'))} failed, answered by versions {fmt(swap.get('versions'))}."
        )
    return "\n\n".join(out)


def edge_goals(r: dict[str, Any]) -> list[tuple[str, str, Any, bool]]:
    """The goals bench_edge.py prints, read from its ratios (only those present)."""
    ratios, out = r.get("ratios", {}), []
    for name in ("unbatched", "batched"):
        v = ratios.get(f"overhead_p50_ms_{name}_c1")
        if v is not None:
            out.append((f"server overhead p50 at 1 client, {name}", "≤ 2 ms", fmt(v) + " ms", v <= 2))
    v = ratios.get("throughput_batched_over_unbatched_c32")
    if v is not None:
        out.append(("micro-batching req/s at 32 clients", "≥ 2×", fmt(v) + "×", v >= 2))
    v = ratios.get("swap_failed_requests")
    if v is not None:
        out.append(("failed requests during a bundle swap", "0", fmt(v), v == 0))
    return out


def section_generic(r: dict[str, Any]) -> str:
    """Any other result: top-level scalars as one table, then one table per group of same-shaped leaf dicts."""
    scalars = [[k, v] for k, v in r.items() if isinstance(v, (int, float, str, bool)) or v is None]
    out = [md_table(["metric", "value"], scalars)] if scalars else []
    groups: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for path, leaf in _leaf_dicts(r):
        groups.setdefault(path.split(".")[0], []).append((path, leaf))
    for group, leaves in groups.items():
        columns = list(dict.fromkeys(k for _, leaf in leaves for k in leaf))[:10]
        rows = [
            [path.removeprefix(group).lstrip(".") or group, *(leaf.get(c) for c in columns)] for path, leaf in leaves
        ]
        out.append(f"`{group}`\n\n" + md_table(["", *columns], rows))
    return "\n\n".join(out) or "(no results)"


def _leaf_dicts(tree: dict[str, Any], prefix: str = "") -> Iterable[tuple[str, dict[str, Any]]]:
    """(path, the dict's scalar values) for every nested dict that has scalar values."""
    for key, value in tree.items():
        if not isinstance(value, dict) or key == "machine":
            continue
        path = f"{prefix}{key}"
        leaf = {k: v for k, v in value.items() if isinstance(v, (int, float, str, bool))}
        if leaf:
            yield path, leaf
        yield from _leaf_dicts(value, f"{path}.")


SECTIONS: dict[str, Callable[[dict[str, Any]], str]] = {
    "inference": section_inference,
    "probe": section_probe,
    "edge": section_edge,
    "training": section_training,
    "pipeline": section_pipeline,
    "limits": section_limits,
}


def render_markdown(merged: dict[str, Any], results_file: str, notes: str | None = None) -> str:
    m = merged["machine"]
    isa = (
        ", ".join(
            label
            for key, label in (("avx512f", "AVX-512F"), ("avx512_vnni", "AVX-512 VNNI"), ("amx", "AMX"))
            if m.get(key)
        )
        or "no AVX-512"
    )
    total = merged["seconds"]["total"]
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `python -m benchmarks run{' --quick' if merged['mode'] == 'quick' else ''}` "
        f"(`make bench`) on {merged['started']}: the **{merged['mode']}** suite, benchmarks {fmt(total / 60, 1)} min "
        f"(budget {merged['budget_s'] // 60} min). Raw results: `{results_file}`. Every claim is a ratio measured "
        "side by side in one run on this machine; absolute times are this CPU's only.",
        "",
        "## Machine",
        "",
        md_table(
            ["CPU", "cores", "GHz", "instruction set", "AMX", "torch", "torch threads", "GPU"],
            [
                [
                    m.get("cpu"),
                    m.get("cores"),
                    fmt(m.get("ghz"), 3),
                    isa,
                    fmt(m.get("amx")),
                    m.get("torch"),
                    m.get("torch_threads"),
                    m.get("gpu") or "none",
                ]
            ],
        ),
        "",
        "## Goals",
        "",
    ]
    kept = merged.get("kept_from_earlier_run")
    if kept:
        ran = merged.get("ran", {})
        when = ", ".join(f"{n} ({ran.get(n, '?')})" for n in kept)
        lines[2] += f" Kept from earlier runs of the same day: {when}."
    goals = [row for name, r in merged["benchmarks"].items() for row in goal_rows(name, r)]
    lines.append(
        md_table(["benchmark", "goal", "target", "measured", "status"], goals) if goals else "(no goals measured)"
    )
    for name, r in merged["benchmarks"].items():
        title = BENCHMARKS.get(name, (None, name))[1]
        lines += ["", f"## {title}", "", f"`{name}`, {fmt(merged['seconds'].get(name), 0)} s.", ""]
        if "error" in r or "skipped" in r:
            kind = "error" if "error" in r else "skipped"
            lines.append(f"**{kind}**: {fmt(r[kind])}")
            continue
        try:
            lines.append(SECTIONS.get(name, section_generic)(r))
        except (KeyError, TypeError, ValueError) as exc:  # a result of another shape: show it raw, do not fail
            lines.append(f"(could not render: {type(exc).__name__}: {exc})\n\n" + section_generic(r))
        if name == "training" and r.get("profile"):
            lines += ["", "### Profile of the training hot path", "", section_profile(r)]
    if merged.get("machine_mismatch"):
        lines += ["", f"Warning: these benchmarks reported a different machine: {merged['machine_mismatch']}."]
    lines += ["", "## Notes", "", NOTES_BEGIN, (notes or DEFAULT_NOTES).strip("\n"), NOTES_END, ""]
    return "\n".join(lines)


DEFAULT_NOTES = """
(Hand-written findings go here; `python -m benchmarks run` keeps whatever is between these markers.)
"""


def kept_notes(existing: str | None) -> str | None:
    """The hand-written notes of an existing BENCHMARKS.md, if it has the markers."""
    if not existing or NOTES_BEGIN not in existing or NOTES_END not in existing:
        return None
    return existing.split(NOTES_BEGIN, 1)[1].split(NOTES_END, 1)[0].strip("\n")


def write_outputs(merged: dict[str, Any], path: Path | None = None, markdown: Path = MARKDOWN) -> tuple[Path, Path]:
    path = path or results_path(merged)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=2, default=_json_default) + "\n")
    return path, write_markdown(merged, path, markdown)


def write_markdown(merged: dict[str, Any], results: Path, markdown: Path = MARKDOWN) -> Path:
    """BENCHMARKS.md from merged results, keeping the hand-written notes of the existing file."""
    old = markdown.read_text() if markdown.is_file() else None
    results = results.resolve()
    shown = results.relative_to(ROOT) if results.is_relative_to(ROOT) else results
    markdown.write_text(render_markdown(merged, str(shown), kept_notes(old)))
    return markdown


# --- command line --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["child"]:
        sep = argv.index("--") if "--" in argv else len(argv)
        return child(argv[1], Path(argv[2]), argv[sep + 1 :])
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the benchmarks, write the results JSON and BENCHMARKS.md")
    run.add_argument("--quick", action="store_true", help="the short version of every benchmark (< 4 min)")
    run.add_argument("--only", nargs="+", metavar="NAME", help=f"run only these, of {list(BENCHMARKS)}")
    run.add_argument("--skip", nargs="+", metavar="NAME", default=[], help="leave these out")
    run.add_argument("--timeout", type=float, default=None, help="seconds per benchmark (default 600, full 900)")
    render = sub.add_parser("render", help="re-write BENCHMARKS.md from a results JSON")
    render.add_argument("results", type=Path)
    args = parser.parse_args(argv)
    if args.command == "render":
        md = write_markdown(json.loads(args.results.read_text()), args.results)
        print(f"wrote {md}")
        return 0
    names = selected(args.only, args.skip)
    merged = run_suite(args.quick, names, args.timeout or (600 if args.quick else 900))
    earlier = results_path(merged)
    if (args.only or args.skip) and earlier.is_file():
        merged = combine(json.loads(earlier.read_text()), merged)
    path, md = write_outputs(merged)
    failed = [n for n, r in merged["benchmarks"].items() if "error" in r]
    print(f"\nwrote {path} and {md} in {merged['seconds']['total'] / 60:.1f} min; failed: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
