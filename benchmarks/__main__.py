"""The benchmark runner: runs every benchmark, each in its own process, and writes one results file and BENCHMARKS.md.

    python -m benchmarks run [--quick] [--model MODEL] [--only NAME …] [--skip NAME …]  (partial: updates the day's)
    python -m benchmarks render benchmarks/results/<machine>-<date>.json                  (re-write BENCHMARKS.md only)

MODEL is what the inference, edge and limits benchmarks measure: a retrain run directory (config.json, model/,
export/bundle/), a bundle directory or archive, or a registered `NAME@ALIAS`; by default the demo's run, the one
`configs/text-tweets.yaml` trains on the pinned data version (see `benchmarks/model.py`).

Each benchmark runs in its own Python process (`python -m benchmarks child MODULE OUT.json ARGS…`, which calls the
module's `main(argv)`), one after the other, so no benchmark inherits another's threads, allocator state, Prefect
server or monkeypatches, and one that crashes does not take the others down. The merged results go to
`benchmarks/results/<machine>-<date>.json` (`…-quick.json` for `--quick`); BENCHMARKS.md at the repository root is
rendered from them by `benchmarks.report` (each benchmark's section lives in `benchmarks/report/<name>.py`). Text
between the notes markers of an existing BENCHMARKS.md is kept.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from benchmarks import report
from benchmarks.common import RESULTS, ROOT, cpu_ghz, machine_info

BUDGET_S = {"quick": 4 * 60, "full": 15 * 60}


class Benchmark(NamedTuple):
    module: str  # its `main(argv)` runs in the child process
    takes_model: bool = False  # measures the model the suite names (`--model`), not the packaged MiniLM


# the order they run in; a module that is not there yet is reported as skipped
BENCHMARKS: dict[str, Benchmark] = {
    "inference": Benchmark("benchmarks.bench_inference", takes_model=True),
    "probe": Benchmark("benchmarks.bench_probe"),
    "edge": Benchmark("benchmarks.bench_edge", takes_model=True),
    "training": Benchmark("benchmarks.bench_training"),
    "pipeline": Benchmark("benchmarks.bench_pipeline"),
    "limits": Benchmark("benchmarks.bench_limits", takes_model=True),
    "vision_loop": Benchmark("benchmarks.bench_vision_loop"),
    "drift": Benchmark("benchmarks.bench_drift"),  # the fixture models: drift scores and tracking's live-path cost
    "rollout": Benchmark("benchmarks.bench_rollout"),  # shadow's live-path cost, a bad candidate's time on the fleet
}


# --- running -------------------------------------------------------------------------------------------------


def module_exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def child_env(prefect_home: str) -> dict[str, str]:
    from flows.prefect_env import DEFAULTS  # no telemetry; a temporary server gets minutes, not 20 s, to start

    env = dict(os.environ)
    env.setdefault("PREFECT_HOME", prefect_home)  # a throwaway Prefect database, never the user's ~/.prefect
    for key, value in DEFAULTS.items():
        env.setdefault(key, value)
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


def run_suite(quick: bool, names: list[str], timeout: float, model: dict[str, str] | None = None) -> dict[str, Any]:
    """Every named benchmark in its own process; `model` (from `named_model`) goes to those that measure one."""
    when = dt.datetime.now()
    outcomes, seconds = {}, {}
    for name in names:
        bench = BENCHMARKS[name]
        argv = ["--quick"] if quick else []
        if bench.takes_model and model:
            argv += ["--model", model["local"]]
        print(f"\n=== {name}: {report.title(name)} ===", flush=True)
        outcomes[name], seconds[name] = run_one(name, bench.module, argv, timeout)
        status = next((k for k in ("error", "skipped") if k in outcomes[name]), "ok")
        print(f"=== {name}: {status} in {seconds[name]:.0f}s ===", flush=True)
    ghz, source = cpu_ghz()
    machine = machine_info() | {"ghz": ghz, "ghz_source": source}
    merged = merge_results(machine, outcomes, seconds, quick, when)
    if model:
        merged["model"] = model["named"]
    return merged


def named_model(spec: str | None, timeout: float) -> dict[str, str] | None:
    """The model the suite measures, resolved once, in a process of its own (`benchmarks/model.py`): a registered
    one is downloaded once and every benchmark gets the same local path. A model named with --model that cannot be
    found stops the suite before anything runs; without --model and without the demo's run, None: the benchmarks
    that need it report what is missing (limits measures a fresh export instead)."""
    found, _ = run_one("model", "benchmarks.model", [spec] if spec else [], timeout)
    if "local" in found:
        return found
    if spec:
        raise SystemExit(found.get("error", f"--model {spec}: could not be resolved"))
    print(found.get("error"), flush=True)
    return None


def write_outputs(
    merged: dict[str, Any], path: Path | None = None, markdown: Path = report.MARKDOWN
) -> tuple[Path, Path]:
    path = path or results_path(merged)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=2, default=_json_default) + "\n")
    return path, report.write_markdown(merged, path, markdown)


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
    run.add_argument(
        "--model",
        default=None,
        help="RUN_DIR, BUNDLE (dir or .tar.gz) or NAME@ALIAS for inference/edge/limits (default: the demo's run)",
    )
    run.add_argument("--only", nargs="+", metavar="NAME", help=f"run only these, of {list(BENCHMARKS)}")
    run.add_argument("--skip", nargs="+", metavar="NAME", default=[], help="leave these out")
    run.add_argument("--timeout", type=float, default=None, help="seconds per benchmark (default 600, full 900)")
    render = sub.add_parser("render", help="re-write BENCHMARKS.md from a results JSON")
    render.add_argument("results", type=Path)
    args = parser.parse_args(argv)
    if args.command == "render":
        print(f"wrote {report.render_file(args.results)}")
        return 0
    names = selected(args.only, args.skip)
    timeout = args.timeout or (600 if args.quick else 900)
    model = named_model(args.model, timeout) if any(BENCHMARKS[n].takes_model for n in names) else None
    merged = run_suite(args.quick, names, timeout, model)
    earlier = results_path(merged)
    if (args.only or args.skip) and earlier.is_file():
        merged = combine(json.loads(earlier.read_text()), merged)
    path, md = write_outputs(merged)
    failed = [n for n, r in merged["benchmarks"].items() if "error" in r]
    print(f"\nwrote {path} and {md} in {merged['seconds']['total'] / 60:.1f} min; failed: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
