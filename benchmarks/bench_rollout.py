"""Safe rollout on the edge: what a shadow candidate costs the live path, and how fast a bad candidate is gone.

    python -m benchmarks.bench_rollout [--quick] [--requests N] [--window S]

1. Shadow overhead. One real edge server process (`transflow-edge serve`, the tests' tiny text model over
   MiniLM's real tokenizer), one client sending one-to-three-text requests one after the other. Blocks of N
   requests alternate, same run: no candidate / a shadow candidate (the same model rebadged, so the candidate
   costs what the live model costs) / none / … (4 blocks each, so a busy box slows both sides alike). p50 and p95
   at the client and the server's own `latency_ms`, with vs without, and their differences; the copies the
   candidate scored and the ones dropped.
2. Bad candidate removal. Three edge server processes under steady traffic, a real MLflow sqlite registry, and
   the deploy flow (`--strategy shadow --waves 1,rest`, window S) deploying a candidate with scrambled labels. A
   poller (20 Hz) sees the candidate appear on the wave-1 server and disappear: that time, minus the window, is
   what judging and dropping cost. The other servers' candidate endpoints must never have been called.

Writes benchmarks/results/rollout-<machine>-<date>.json. The tiny model makes a request cheap, so the shadow's
share of it is an upper bound of what a real model sees; its absolute cost (ms) is the figure to read.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from transflow_edge.bundle import pack
from transflow_edge.client import EdgeClient

from benchmarks.common import machine_info, write_result
from benchmarks.edge_load import TOKEN, EdgeProcess
from tests.edge_fixtures import build_text_bundle
from tests.rollout_fixtures import rebadge, send_traffic, texts


def pct(ms: list[float]) -> dict[str, float]:
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p95_ms": round(float(np.percentile(ms, 95)), 3)}


def shadow_overhead(root: Path, live: Path, requests: int, blocks: int) -> dict[str, Any]:
    candidate = pack(rebadge(live, root / "shadow-candidate", "2"), root / "shadow-candidate.tar.gz")
    server = EdgeProcess(live, 32, 1, root)
    client_ms: dict[str, list[float]] = {"without": [], "with": []}
    server_ms: dict[str, list[float]] = {"without": [], "with": []}
    bodies = texts(requests)
    try:
        with EdgeClient(server.url, token=TOKEN) as admin, httpx.Client(base_url=server.url, timeout=60) as http:
            for body in bodies[:50]:  # warm up
                http.post("/v1/predict", json={"inputs": body})
            for block in range(2 * blocks):
                side = "without" if block % 2 == 0 else "with"
                if side == "with":
                    admin.upload_candidate(candidate, "shadow")
                for body in bodies:
                    began = time.perf_counter()
                    answer = http.post("/v1/predict", json={"inputs": body}).json()
                    client_ms[side].append((time.perf_counter() - began) * 1000)
                    server_ms[side].append(answer["latency_ms"])
                if side == "with":
                    time.sleep(0.2)  # let the worker finish its queue before the figures are read
                    figures = admin.candidate()["figures"]
                    scored = figures["candidate"]["requests"]
                    dropped = figures["dropped"]
                    admin.drop_candidate()
    finally:
        server.stop()
    out: dict[str, Any] = {"requests_per_side": len(client_ms["with"]), "blocks_per_side": blocks}
    for name, series in (("client", client_ms), ("server", server_ms)):
        without, with_ = pct(series["without"]), pct(series["with"])
        out[name] = {
            "without": without,
            "with": with_,
            "p50_added_ms": round(with_["p50_ms"] - without["p50_ms"], 3),
            "p95_added_ms": round(with_["p95_ms"] - without["p95_ms"], 3),
            "p50_ratio": round(with_["p50_ms"] / without["p50_ms"], 3),
            "p95_ratio": round(with_["p95_ms"] / without["p95_ms"], 3),
        }
    out["last_block"] = {"scored_by_candidate": scored, "dropped": dropped}
    return out


def bad_candidate_removal(root: Path, live: Path, window_s: float) -> dict[str, Any]:
    from flows.deploy import DeployError, deploy
    from tasks.tracking import Tracker
    from tests.test_deploy import register, sha_of

    bad = rebadge(live, root / "bad", "3", scramble=True)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tracker = Tracker(uri)
    (root / "bad-archive").mkdir()
    register(tracker, pack(bad, root / "bad-archive" / "bundle.tar.gz"), sha_of(bad), "scrambled")
    for i in range(3):
        (root / f"fleet{i}").mkdir()
    servers = [EdgeProcess(live, 32, 1, root / f"fleet{i}") for i in range(3)]
    urls = [s.url for s in servers]
    stop = threading.Event()
    seen: dict[str, float] = {}

    def poll() -> None:
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                held = http.get(f"{urls[0]}/v1/model").json().get("candidate")
                now = time.monotonic()
                if held and "appeared" not in seen:
                    seen["appeared"] = now
                if not held and "appeared" in seen and "gone" not in seen:
                    seen["gone"] = now
                time.sleep(0.05)

    senders = [threading.Thread(target=send_traffic, args=(urls, stop), daemon=True) for _ in range(2)]
    threads = [*senders, threading.Thread(target=poll)]
    for t in threads:
        t.start()
    os.environ["TRANSFLOW_EDGE_TOKEN"] = TOKEN
    rules = {"window_s": window_s, "min_samples": 20}
    began = time.monotonic()
    try:
        deploy("tweets-sentiment@scrambled", urls, tracking_uri=uri, strategy="shadow", rules=rules)
        verdict = "deployed (the rules did not catch it)"
    except DeployError as exc:
        verdict = str(exc).splitlines()[0]
    finally:
        flow_s = time.monotonic() - began
        time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join(timeout=30)
        prefix = 'transflow_edge_requests_total{endpoint="/v1/admin/candidate"'
        calls = []
        for url in urls:
            lines = httpx.get(f"{url}/metrics", timeout=10).text.splitlines()
            calls.append(sum(float(ln.split()[-1]) for ln in lines if ln.startswith(prefix)))
        for s in servers:
            s.stop()
    on_fleet = seen["gone"] - seen["appeared"] if {"appeared", "gone"} <= seen.keys() else None
    return {
        "window_s": window_s,
        "verdict": verdict,
        "first_wave_to_removal_s": None if on_fleet is None else round(on_fleet, 2),
        "judge_and_drop_s": None if on_fleet is None else round(on_fleet - window_s, 2),
        "flow_wall_s": round(flow_s, 1),
        "candidate_calls_per_server": calls,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--requests", type=int, default=None, help="requests per block (default 250, quick 100)")
    parser.add_argument("--window", type=float, default=None, help="watch window in s (default 10, quick 3)")
    args = parser.parse_args(argv)
    requests = args.requests or (100 if args.quick else 250)
    window = args.window or (3.0 if args.quick else 10.0)
    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp:
        root = Path(tmp)
        live = build_text_bundle(root / "live", version="1")
        results = {
            "machine": machine_info(),
            "load_average_at_start": os.getloadavg(),
            "shadow": shadow_overhead(root, live, requests, blocks=4),
            "bad_candidate": bad_candidate_removal(root, live, window),
        }
    results["load_average_at_end"] = os.getloadavg()
    bad = results["bad_candidate"]
    added, gone = results["shadow"]["server"]["p50_added_ms"], bad["first_wave_to_removal_s"]
    kept_out = gone is not None and not any(bad["candidate_calls_per_server"][1:])
    results["goals"] = {  # the issue's: shadow adds under 1 ms to the live p50; a bad candidate never passes wave 1
        "shadow_p50_added_ms": {"target": "< 1 ms", "value": added, "met": added < 1.0},
        "bad_candidate_removed_s": {"target": "dropped after wave 1", "value": gone, "met": kept_out},
    }
    print_table(results)
    path = write_result("rollout", results)
    print(f"wrote {path}")
    return results


def print_table(r: dict[str, Any]) -> None:
    s = r["shadow"]
    print(f"\nShadow overhead, {s['requests_per_side']} requests a side in {s['blocks_per_side']} alternating blocks:")
    print(f"{'':8} {'p50 without':>12} {'p50 with':>9} {'added':>7} {'p95 without':>12} {'p95 with':>9} {'added':>7}")
    for name in ("client", "server"):
        x = s[name]
        print(f"{name:8} {x['without']['p50_ms']:12.3f} {x['with']['p50_ms']:9.3f} {x['p50_added_ms']:7.3f} "
              f"{x['without']['p95_ms']:12.3f} {x['with']['p95_ms']:9.3f} {x['p95_added_ms']:7.3f}")  # fmt: skip
    print(f"last block: {s['last_block']}")
    b = r["bad_candidate"]
    print(f"\nBad candidate: {b['verdict']}")
    print(f"on the fleet {b['first_wave_to_removal_s']} s (window {b['window_s']} s, "
          f"judge+drop {b['judge_and_drop_s']} s); candidate calls per server {b['candidate_calls_per_server']}; "
          f"load {r['load_average_at_start']}")  # fmt: skip


if __name__ == "__main__":
    main()
