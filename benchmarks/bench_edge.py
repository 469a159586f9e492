"""The edge server under load, side by side in one run, against a real server process on loopback.

With the demo's exported bundle and real test tweets (one text per request), the server being the edge
distribution's own `transflow-edge serve`:
- p50/p99 latency and throughput at concurrency 1, 8, 32 and 64, with adaptive micro-batching (max_batch 32)
  and without (1);
- server overhead: p50 at concurrency 1 against a bare `InferenceSession.run` on the same inputs with the same
  preprocessing (the edge's TextPreprocessor) and the same session options;
- a bundle swap under load (upload, rollback, rollback): failed requests must be zero;
- `/healthz` p99 while hostile clients send 20,000-part multipart bodies and 16 MB JSON bodies (all refused);
- the edge distribution alone in a fresh venv (pinned by the constraints file): install time and size, beside
  the size of the full install (.venv).

Client and server share this machine's cores, so absolute numbers include the load generator's own cost.
Prints a table of ratios and writes JSON to benchmarks/results/. Usage:

    python -m benchmarks.bench_edge [--quick] [--model BUNDLE | RUN_DIR | NAME@ALIAS] [--threads N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from transflow_edge.bundle import Bundle, pack, verify_bundle, write_manifest
from transflow_edge.preprocess import TextPreprocessor
from transflow_edge.server import open_session

from benchmarks.common import machine_info, write_result
from benchmarks.edge_load import TOKEN, EdgeProcess, load, percentiles
from benchmarks.model import resolve_model

ROOT = Path(__file__).resolve().parents[1]
CONCURRENCY = (1, 8, 32, 64)
BATCHING = {"batched": 32, "unbatched": 1}


def bare_session(bundle: Bundle, texts: list[str], threads: int) -> dict[str, float]:
    """Preprocess one text and run the session, as the server does per request, without HTTP or batching."""
    pre = TextPreprocessor.from_bundle(bundle)
    session = open_session(bundle.default_model, threads)
    names = [i.name for i in session.get_inputs()]
    times = []
    for i, text in enumerate(texts):
        start = time.perf_counter()
        features = pre([text])
        session.run(None, {k: features[k] for k in names})
        if i >= 10:  # warm-up
            times.append(time.perf_counter() - start)
    return percentiles(times) | {"throughput_per_s": len(times) / sum(times)}


# ---------------------------------------------------------------- a server process


def batch_totals(url: str) -> tuple[float, float]:
    """(items, onnxruntime calls) so far, from the server's own Prometheus metrics."""
    values = dict(
        line.rsplit(" ", 1)
        for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines()
        if line.startswith(("transflow_edge_batch_size_sum", "transflow_edge_batch_size_count"))
    )
    return float(values["transflow_edge_batch_size_sum"]), float(values["transflow_edge_batch_size_count"])


def sweep(server: EdgeProcess, texts: list[str], seconds: float, warmup: float) -> dict[str, Any]:
    """Each concurrency in turn, with the mean items per onnxruntime call the server saw meanwhile."""
    out = {}
    for c in CONCURRENCY:
        items, calls = batch_totals(server.url)
        out[f"c{c}"] = asyncio.run(load(server.url, texts, c, seconds, warmup))
        items_after, calls_after = batch_totals(server.url)
        out[f"c{c}"]["mean_batch"] = (items_after - items) / max(calls_after - calls, 1)
    return out


# ---------------------------------------------------------------- swap under load


def swap_variant(bundle: Bundle, workdir: Path) -> Path:
    """The same model as a new bundle (another version, so another sha256), without the unused model file."""
    out = workdir / "swap-bundle"
    out.mkdir()
    names = [n for n in bundle.manifest["files"] if not n.endswith(".onnx")] + [bundle.manifest["default_model"]]
    for name in names:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(bundle.path(name), out / name)
    meta = {k: v for k, v in bundle.manifest.items() if k not in ("format", "format_version", "files")}
    write_manifest(out, {**meta, "version": f"{meta.get('version', '')}-swap"})
    return pack(verify_bundle(out).root, workdir / "swap.tar.gz")


def swap_under_load(server: EdgeProcess, archive: Path, texts: list[str], concurrency: int) -> dict[str, Any]:
    """Upload, roll back, roll forward while `concurrency` clients keep predicting; every request must succeed."""
    steps: list[dict[str, Any]] = []
    done = threading.Event()

    def admin() -> None:
        calls = [("/v1/admin/bundles", archive.read_bytes()), ("/v1/admin/rollback", b""), ("/v1/admin/rollback", b"")]
        auth = {"Authorization": f"Bearer {TOKEN}"}
        try:
            with httpx.Client(base_url=server.url, timeout=300, headers=auth) as client:
                for path, body in calls:
                    time.sleep(1.0)
                    start = time.perf_counter()
                    answer = client.post(path, content=body)
                    seconds = round(time.perf_counter() - start, 3)
                    steps.append(
                        {"call": path, "http": answer.status_code, "answer": answer.json(), "seconds": seconds}
                    )
                time.sleep(1.0)
        finally:
            done.set()

    thread = threading.Thread(target=admin)
    thread.start()
    result = asyncio.run(load(server.url, texts, concurrency, 600.0, 0.0, stop=done))
    thread.join()
    steps = [{**s, "status": s["answer"].get("status"), "version": s["answer"].get("version")} for s in steps]
    return result | {"steps": [{k: v for k, v in s.items() if k != "answer"} for s in steps]}


# ---------------------------------------------------------------- overhead, paired


def paired_overhead(server: EdgeProcess, bundle: Bundle, texts: list[str], threads: int, n: int) -> dict[str, Any]:
    """One text through a bare session, then the same text through the server, alternately: each pair sees the
    same machine load, so the median of the differences holds on a busy box where two separate runs do not."""
    pre = TextPreprocessor.from_bundle(bundle)
    session = open_session(bundle.default_model, threads)
    names = [i.name for i in session.get_inputs()]
    bare, served = [], []
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for i, text in enumerate(texts[: n + 10]):
            start = time.perf_counter()
            features = pre([text])
            session.run(None, {k: features[k] for k in names})
            middle = time.perf_counter()
            client.post("/v1/predict", json={"inputs": [text]}).raise_for_status()
            end = time.perf_counter()
            if i >= 10:
                bare.append(middle - start)
                served.append(end - middle)
    diffs = (np.asarray(served) - np.asarray(bare)) * 1000
    return {
        "pairs": len(diffs),
        "overhead_p50_ms": float(np.median(diffs)),
        "bare_p50_ms": float(np.median(bare) * 1000),
        "server_p50_ms": float(np.median(served) * 1000),
    }


# ---------------------------------------------------------------- hostile clients


def healthz_under_attack(server: EdgeProcess, seconds: float) -> dict[str, Any]:
    """`/healthz` latency while two hostile clients loop: a 1.4 MB multipart body of 20,000 parts and a 16 MB
    JSON list of empty objects (both must be refused with a 4xx)."""
    part = b'--b0\r\nContent-Disposition: form-data; name="f"; filename="x.png"\r\n\r\nx\r\n'
    bodies = [
        (part * 20_000 + b"--b0--\r\n", "multipart/form-data; boundary=b0"),
        (b'{"inputs": [' + b"{}," * (16_000_000 // 3 - 10) + b"{}]}", "application/json"),
    ]
    statuses: dict[str, int] = {}
    stop = threading.Event()

    def attack(body: bytes, content_type: str) -> None:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            while not stop.is_set():
                try:
                    answer = client.post("/v1/predict", content=body, headers={"Content-Type": content_type})
                    code = str(answer.status_code)
                except httpx.HTTPError as exc:
                    code = type(exc).__name__
                statuses[code] = statuses.get(code, 0) + 1

    attackers = [threading.Thread(target=attack, args=body) for body in bodies]
    for thread in attackers:
        thread.start()
    latencies = []
    try:
        time.sleep(0.5)
        with httpx.Client(base_url=server.url, timeout=30) as health:
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                start = time.perf_counter()
                health.get("/healthz")
                latencies.append(time.perf_counter() - start)
                time.sleep(0.01)
    finally:
        stop.set()
        for thread in attackers:
            thread.join(timeout=120)
    return percentiles(latencies) | {"hostile_statuses": statuses}


# ---------------------------------------------------------------- the edge distribution alone


def du_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink()) / 1e6


def install_footprint(workdir: Path) -> dict[str, Any]:
    """Install only ./edge into a fresh venv (pip's cache as it is): seconds and MB, beside the full .venv's MB."""
    source = workdir / "edge-src"
    shutil.copytree(ROOT / "edge", source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    venv = workdir / "edge-venv"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    constraints = str(ROOT / "requirements" / "constraints.txt")
    subprocess.run([*pip, "-c", constraints, str(source)], cwd=workdir, check=True)  # cwd: not the checkout
    seconds = time.perf_counter() - start
    torch = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch"], cwd=workdir, capture_output=True)
    full = ROOT / ".venv"
    return {
        "edge_install_seconds": round(seconds, 1),
        "edge_venv_mb": round(du_mb(venv), 1),
        "edge_has_torch": torch.returncode == 0,
        "full_venv_mb": round(du_mb(full), 1) if full.is_dir() else None,
    }


# ---------------------------------------------------------------- the run


def read_texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def ratios(results: dict[str, Any]) -> dict[str, Any]:
    batched, unbatched, bare = results["server"]["batched"], results["server"]["unbatched"], results["bare"]
    out: dict[str, Any] = {
        f"throughput_batched_over_unbatched_c{c}": batched[f"c{c}"]["throughput_per_s"]
        / unbatched[f"c{c}"]["throughput_per_s"]
        for c in CONCURRENCY
    }
    for name, runs in (("batched", batched), ("unbatched", unbatched)):
        out[f"overhead_p50_ms_{name}_c1"] = runs["c1"]["p50_ms"] - bare["p50_ms"]
        out[f"overhead_p50_ms_{name}_c1_server_side"] = runs["c1"]["server_p50_ms"] - bare["p50_ms"]
        out[f"p50_ratio_{name}_c1_over_bare"] = runs["c1"]["p50_ms"] / bare["p50_ms"]
    for name, paired in results["paired"].items():
        out[f"overhead_p50_ms_{name}_paired"] = paired["overhead_p50_ms"]
    out["swap_failed_requests"] = results["swap"]["failed"]
    out["throughput_batched_over_unbatched_min"] = min(
        out[f"throughput_batched_over_unbatched_c{c}"] for c in CONCURRENCY
    )
    out["healthz_p99_ms_under_attack"] = results["hostile"]["p99_ms"]
    return out


def _met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def print_table(results: dict[str, Any]) -> None:
    setup, bare, r, swap = results["setup"], results["bare"], results["ratios"], results["swap"]
    print(f"\nedge server on loopback: {setup['model']} ({setup['default_model']}), {setup['texts']} real test tweets,")
    print(f"one text per request, {setup['seconds_per_point']} s per point, onnxruntime threads {setup['threads']}")
    loads = (setup["load_average_before"][0], setup["load_average_after"][0])
    print(f"machine load average (1 min) before/after: {loads[0]:.1f}/{loads[1]:.1f} on {os.cpu_count()} cores")
    print(
        f"{'clients':>7} │ {'batched p50':>11} {'p99':>7} {'req/s':>7} │ "
        f"{'unbatched p50':>13} {'p99':>7} {'req/s':>7} │ {'req/s ×':>7} {'mean batch':>10}"
    )
    for c in CONCURRENCY:
        b, u = results["server"]["batched"][f"c{c}"], results["server"]["unbatched"][f"c{c}"]
        print(
            f"{c:>7} │ {b['p50_ms']:>11.2f} {b['p99_ms']:>7.2f} {b['throughput_per_s']:>7.1f} │ "
            f"{u['p50_ms']:>13.2f} {u['p99_ms']:>7.2f} {u['throughput_per_s']:>7.1f} │ "
            f"{r[f'throughput_batched_over_unbatched_c{c}']:>7.2f} {b['mean_batch']:>10.1f}"
        )
    print(
        f"bare InferenceSession.run (same preprocessing, 1 text): p50 {bare['p50_ms']:.2f}, p99 {bare['p99_ms']:.2f} ms"
    )
    for name in ("unbatched", "batched"):
        paired = results["paired"][name]
        print(
            f"server overhead, paired with a bare run of the same text, {name:<9}: {paired['overhead_p50_ms']:+.2f} ms "
            f"p50 over {paired['pairs']} pairs (bare {paired['bare_p50_ms']:.2f}, served {paired['server_p50_ms']:.2f})"
        )
        added, inside = r[f"overhead_p50_ms_{name}_c1"], r[f"overhead_p50_ms_{name}_c1_server_side"]
        ratio = r[f"p50_ratio_{name}_c1_over_bare"]
        print(
            f"server overhead, 1 client, {name:<9}: {added:+.2f} ms p50 (×{ratio:.2f}; inside the server {inside:+.2f})"
        )
    print(
        f"swap under load ({setup['swap_concurrency']} clients; upload, rollback, rollback): "
        f"{swap['requests']} requests, {swap['failed']} failed, answered by versions {swap['versions']}"
    )
    print(
        "  admin calls: "
        + ", ".join(
            f"{s['status'] or 'HTTP ' + str(s['http'])} v{s['version']} in {s['seconds']:.2f} s" for s in swap["steps"]
        )
    )
    print(
        f"/healthz under hostile bodies: p50 {results['hostile']['p50_ms']:.1f} ms, p99 "
        f"{results['hostile']['p99_ms']:.1f} ms; hostile answers {results['hostile']['hostile_statuses']}"
    )
    inst = results["install"]
    print(
        f"edge distribution alone: installed in {inst['edge_install_seconds']} s, {inst['edge_venv_mb']} MB "
        f"(torch importable: {inst['edge_has_torch']}); full .venv {inst['full_venv_mb']} MB"
    )
    print(
        "goals: ≤ 2 ms p50 overhead at 1 client (paired): "
        f"unbatched {_met(r['overhead_p50_ms_unbatched_paired'] <= 2)}, "
        f"batched {_met(r['overhead_p50_ms_batched_paired'] <= 2)}; batching never below 1.0× req/s: "
        f"{_met(r['throughput_batched_over_unbatched_min'] >= 1)}; ≥ 1.5× at 32 clients: "
        f"{_met(r['throughput_batched_over_unbatched_c32'] >= 1.5)}; "
        f"no failed swap request: {_met(swap['failed'] == 0)}"
    )


def run(bundle_dir: Path, texts: list[str], threads: int, seconds: float, warmup: float, bare_n: int) -> dict[str, Any]:
    bundle = verify_bundle(bundle_dir)
    results: dict[str, Any] = {
        "setup": {
            "model": f"{bundle.manifest.get('name')} v{bundle.manifest.get('version')}",
            "bundle": str(bundle_dir),
            "bundle_sha256": bundle.sha256,
            "default_model": bundle.manifest["default_model"],
            "texts": len(texts),
            "threads": threads,
            "seconds_per_point": seconds,
            "warmup_seconds": warmup,
            "max_wait_ms": 2.0,
            "max_batch": BATCHING["batched"],
            "swap_concurrency": 8,
            "load_average_before": os.getloadavg(),
        }
    }
    bare_before = bare_session(bundle, texts[: bare_n + 10], threads)  # no server running: no contention
    results["server"] = {}
    with tempfile.TemporaryDirectory(prefix="bench-edge-") as tmp:
        workdir = Path(tmp)
        for name, max_batch in BATCHING.items():
            server = EdgeProcess(bundle_dir, max_batch, threads, workdir)
            try:
                results["server"][name] = sweep(server, texts, seconds, warmup)
                results.setdefault("paired", {})[name] = paired_overhead(server, bundle, texts, threads, bare_n // 4)
                if name == "batched":
                    archive = swap_variant(bundle, workdir)
                    results["swap"] = swap_under_load(server, archive, texts, 8)
                    results["hostile"] = healthz_under_attack(server, min(seconds, 10.0))
            finally:
                server.stop()
        results["install"] = install_footprint(workdir)
    bare_after = bare_session(bundle, texts[: bare_n + 10], threads)
    # The faster of two runs (before and after the servers) is the baseline: noise on a shared box only inflates.
    results["bare"] = min(bare_before, bare_after, key=lambda r: r["p50_ms"]) | {"runs": [bare_before, bare_after]}
    results["ratios"] = ratios(results)
    results["setup"]["load_average_after"] = os.getloadavg()
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        "--bundle",
        default=None,
        help="BUNDLE (dir or .tar.gz), RUN_DIR or NAME@ALIAS (default: the demo's run; see benchmarks/model.py)",
    )
    parser.add_argument("--texts", type=Path, default=Path("data/tweets/test.jsonl"), help="JSONL with a 'text' field")
    parser.add_argument(
        "--threads", type=int, default=0, help="onnxruntime intra-op threads, server and bare (0: auto)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="3 s per point and 300 bare calls instead of 15 s and 2000"
    )
    args = parser.parse_args(argv)
    bundle_dir = resolve_model(args.model).bundle
    seconds, warmup, bare_n = (3.0, 1.0, 300) if args.quick else (15.0, 2.0, 2000)
    results = run(bundle_dir, read_texts(args.texts), args.threads, seconds, warmup, bare_n)
    results["machine"] = machine_info()
    print_table(results)
    print(f"wrote {write_result('edge', results)}")
    if results["swap"]["failed"]:
        raise SystemExit(f"{results['swap']['failed']} requests failed during the swap: {results['swap']['failures']}")
    return results


if __name__ == "__main__":
    main()
