"""Drift the edge can see: PSI per statistic on shifted vs unshifted traffic, and what tracking costs the live path.

    python -m benchmarks.bench_drift [--quick] [--requests N]

1. Scores. Two real edge servers on loopback (tiny random-weight models over MiniLM's real tokenizer and 8x8
   digits; `tests/drift_data.py`) with references written by the exporter's code from real data (600 tweets; one
   half of sklearn's digits). Each gets unshifted traffic (other tweets; the other half of the digits) and, after a
   reload that resets the counts, shifted traffic (sentences of Python's documentation; the same digits inverted),
   N inputs each. The PSI per statistic of each, side by side, from `GET /v1/drift`.
2. Cost. Two text servers side by side, identical but for the bundle's reference_stats.json (no reference: no
   tracking), one-text requests sent to both in alternation (paired, so a busy box slows both alike): p50 and p95
   latency of each (at the client, and the server's own `latency_ms`: request start to answer, which includes
   counting the input; the output is counted after the answer went back) and the paired difference. Plus the
   in-process cost of the tracker's two calls per request (µs).

Writes benchmarks/results/drift-<machine>-<date>.json. The tiny models make a request cheap, so the tracking's share
of it is an upper bound of what a real model sees.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from transflow_edge import drift
from transflow_edge.bundle import MANIFEST, verify_bundle, write_manifest
from transflow_edge.model import load_model
from transflow_edge.server import Settings, create_app

from benchmarks.common import machine_info, write_result
from tests import drift_data
from tests.edge_fixtures import TOKEN, running_server

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def serve(bundle: Path, state: Path) -> Any:
    return running_server(create_app(Settings(bundle=bundle, state_dir=state, token=TOKEN, intra_op_threads=1)))


def send(client: httpx.Client, inputs: list, per_request: int = 10) -> None:
    for i in range(0, len(inputs), per_request):
        client.post("/v1/predict", json={"inputs": inputs[i : i + per_request]}).raise_for_status()


def scores(bundle: Path, work: Path, traffic: dict[str, list]) -> dict[str, dict[str, float]]:
    """PSI per statistic of each kind of traffic, each on a freshly started server (counts from zero)."""
    out = {}
    for kind, inputs in traffic.items():
        with serve(bundle, work / f"state-{kind}") as url, httpx.Client(base_url=url, timeout=60) as client:
            send(client, inputs)
            stats = client.get("/v1/drift").json()["statistics"]
        out[kind] = {name: s["psi"] for name, s in stats.items()}
    return out


def without_reference(bundle: Path, out: Path) -> Path:
    """The same bundle without reference_stats.json: an older export, whose server tracks nothing."""
    shutil.copytree(bundle, out)
    (out / drift.REFERENCE).unlink()
    manifest = json.loads((out / MANIFEST).read_text())
    write_manifest(out, {k: v for k, v in manifest.items() if k not in ("format", "format_version", "files")})
    return out


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def live_cost(bundle: Path, work: Path, texts: list[str], rounds: int) -> dict[str, Any]:
    plain = without_reference(bundle, work / "plain")
    latencies: dict[str, list[float]] = {"tracked": [], "untracked": []}
    inside: dict[str, list[float]] = {"tracked": [], "untracked": []}  # the server's own latency_ms
    with (
        serve(bundle, work / "s-tracked") as tracked,
        serve(plain, work / "s-untracked") as untracked,
        httpx.Client(timeout=60) as client,
    ):
        urls = {"tracked": tracked, "untracked": untracked}
        for i in range(rounds + 50):
            order = ("tracked", "untracked") if i % 2 == 0 else ("untracked", "tracked")
            for name in order:
                began = time.perf_counter()
                response = client.post(f"{urls[name]}/v1/predict", json={"inputs": [texts[i % len(texts)]]})
                response.raise_for_status()
                if i >= 50:  # the first 50 pairs warm up
                    latencies[name].append((time.perf_counter() - began) * 1000)
                    inside[name].append(response.json()["latency_ms"])
        assert client.get(f"{tracked}/v1/drift").json()["available"]
        assert not client.get(f"{untracked}/v1/drift").json()["available"]
    row = {
        name: {"p50_ms": percentile(x, 50), "p95_ms": percentile(x, 95), "n": len(x)} for name, x in latencies.items()
    }
    for name, x in inside.items():
        row[name] |= {"server_p50_ms": percentile(x, 50), "server_p95_ms": percentile(x, 95)}
    diffs = [a - b for a, b in zip(latencies["tracked"], latencies["untracked"], strict=True)]
    row["paired_difference_ms"] = {"median": statistics.median(diffs), "p95_of_tracked_minus_p95_of_untracked":
                                   row["tracked"]["p95_ms"] - row["untracked"]["p95_ms"]}  # fmt: skip
    return row


def tracker_cost(bundle: Path, texts: list[str], repeats: int) -> dict[str, float]:
    """µs per request (one text) of what tracking adds: counting the prepared input and the logits."""
    model = load_model(verify_bundle(bundle))
    assert model.drift is not None
    prepared = [model.preprocessor.prepare([t]) for t in texts]
    logits = [model.logits(p) for p in prepared]
    began = time.perf_counter()
    for i in range(repeats):
        model.drift.observe_inputs(prepared[i % len(prepared)])
    inputs_us = (time.perf_counter() - began) / repeats * 1e6
    began = time.perf_counter()
    for i in range(repeats):
        model.drift.observe_outputs(logits[i % len(logits)])
    outputs_us = (time.perf_counter() - began) / repeats * 1e6
    return {"observe_inputs_us": inputs_us, "observe_outputs_us": outputs_us, "repeats": repeats}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="400 inputs per traffic kind, 300 latency pairs")
    parser.add_argument("--requests", type=int, default=0, help="inputs per traffic kind (default 1000; quick 400)")
    args = parser.parse_args(argv)
    n = args.requests or (400 if args.quick else 1000)
    rounds = 300 if args.quick else 1000
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-drift-") as tmp:
        work = Path(tmp)
        text, image = drift_data.text_bundle(work / "text"), drift_data.image_bundle(work / "image")
        results: dict[str, Any] = {
            "inputs_per_kind": n,
            "threshold": 0.25,
            "text_psi": scores(text, work, {"unshifted (other tweets)": drift_data.tweets(n, 1),
                                            "shifted (Python docs)": drift_data.other_domain_texts(n, 1)}),
            "image_inputs_per_kind": min(n, 800),  # one half of sklearn's 1,797 digits, the reference drew on the other
            "image_psi": scores(image, work, {"unshifted (other digits)": drift_data.digits(min(n, 800), 1),
                                              "shifted (inverted digits)": drift_data.digits(min(n, 800), 1, True)}),
        }  # fmt: skip
        texts = drift_data.tweets(200, 9)
        results["live_path"] = live_cost(text, work, texts, rounds)
        results["tracker"] = tracker_cost(text, texts, 2000 if args.quick else 10000)
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["machine"] = machine_info()
    for key in ("text_psi", "image_psi"):
        for kind, row in results[key].items():
            print(f"{kind:28s} " + "  ".join(f"{s} {v:.3f}" for s, v in row.items()))
    lp = results["live_path"]
    t, u = lp["tracked"], lp["untracked"]
    print(f"server p50/p95 ms: tracked {t['server_p50_ms']:.3f}/{t['server_p95_ms']:.3f}, "
          f"untracked {u['server_p50_ms']:.3f}/{u['server_p95_ms']:.3f}")  # fmt: skip
    print(f"live p50/p95 ms: tracked {lp['tracked']['p50_ms']:.2f}/{lp['tracked']['p95_ms']:.2f}, untracked "
          f"{lp['untracked']['p50_ms']:.2f}/{lp['untracked']['p95_ms']:.2f}; paired median difference "
          f"{lp['paired_difference_ms']['median']:.3f} ms; tracker {results['tracker']}")  # fmt: skip
    print(f"wrote {write_result('drift', results)}")
    return results


if __name__ == "__main__":
    main()
