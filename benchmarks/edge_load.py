"""A real edge server process and a load generator for the benchmarks that drive one (bench_edge, bench_rollout):
`transflow-edge serve` in a subprocess on a free loopback port (the product's own socket handling, not an
in-process test server), and `load`: N concurrent clients posting one text at a time.
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "bench-edge-token-0123456789"


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "n": len(ms)}


# ---------------------------------------------------------------- the bare baseline


class EdgeProcess:
    """`transflow-edge serve` (the edge distribution's CLI) in a subprocess on a free loopback port."""

    def __init__(self, bundle: Path, max_batch: int, threads: int, workdir: Path) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        token_file = workdir / "token"
        token_file.write_text(TOKEN)
        self.log = workdir / f"server-{max_batch}.log"
        state = workdir / f"state-{max_batch}"
        command = [sys.executable, "-m", "transflow_edge.cli", "serve", "--bundle", str(bundle)]
        command += ["--state-dir", str(state), "--port", str(self.port), "--token-file", str(token_file)]
        command += ["--max-batch", str(max_batch), "--threads", str(threads), "--log-level", "warning"]
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"edge server exited:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise SystemExit(f"edge server not ready in 120 s:\n{self.log.read_text()}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---------------------------------------------------------------- load


async def load(
    url: str, texts: list[str], concurrency: int, seconds: float, warmup: float, stop: threading.Event | None = None
) -> dict[str, Any]:
    """`concurrency` clients, each posting one text at a time for `seconds` (or until `stop`); the first `warmup`
    seconds are not counted. Every non-200 answer and every transport error is a failure."""
    client_s, server_ms, failures, versions = [], [], [], {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        counted = time.perf_counter() + warmup
        end = counted + seconds

        async def worker(index: int) -> None:
            while time.perf_counter() < end and not (stop is not None and stop.is_set()):
                text = texts[index % len(texts)]
                index += concurrency
                start = time.perf_counter()
                try:
                    response = await client.post("/v1/predict", json={"inputs": [text]})
                except httpx.HTTPError as exc:
                    failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                if response.status_code != 200:
                    failures.append(f"{response.status_code}: {response.text[:200]}")
                    continue
                body = response.json()
                versions[body["model"]["version"]] = versions.get(body["model"]["version"], 0) + 1
                if start >= counted:
                    client_s.append(time.perf_counter() - start)
                    server_ms.append(body["latency_ms"])

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - counted
    return percentiles(client_s) | {
        "throughput_per_s": len(client_s) / elapsed,
        "server_p50_ms": statistics.median(server_ms) if server_ms else float("nan"),
        "requests": sum(versions.values()) + len(failures),
        "failed": len(failures),
        "failures": failures[:5],
        "versions": versions,
    }
