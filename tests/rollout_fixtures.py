"""Candidate bundles made from a good one: the same model under a new version, or with its labels scrambled
(labels.json rotated, so every answer names the wrong class while the golden check, by class index, still passes:
a bundle that loads and verifies cleanly and is wrong on every request)."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

from transflow_edge.bundle import write_manifest


def rebadge(src: Path, out: Path, version: str, scramble: bool = False) -> Path:
    """A copy of bundle `src` as `version`; with `scramble`, labels.json rotated by one."""
    shutil.copytree(src, out)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").unlink()
    if scramble:
        labels = json.loads((out / "labels.json").read_text())
        (out / "labels.json").write_text(json.dumps(labels[1:] + labels[:1]) + "\n")
    meta = {k: v for k, v in manifest.items() if k not in ("files", "format", "format_version")}
    write_manifest(out, meta | {"version": version})
    return out


def texts(n: int, seed: int = 0) -> list[list[str]]:
    """`n` request bodies of 1-3 short varied texts (deterministic)."""
    words = [
        "good",
        "bad",
        "awful",
        "great",
        "phone",
        "service",
        "battery",
        "love",
        "hate",
        "meeting",
        "noon",
        "fine",
        "slow",
        "fast",
        "never",
        "again",
    ]
    out = []
    for i in range(n):
        k = 1 + (i * 7 + seed) % 3
        out.append([" ".join(words[(i * 3 + j * 5 + w + seed) % len(words)] for w in range(2 + j)) for j in range(k)])
    return out


def send_traffic(urls: list[str], stop: threading.Event, seed: int = 0) -> None:
    """Live traffic for a rollout: round-robin `/v1/predict` posts to every server until `stop` is set."""
    import httpx

    bodies = texts(200, seed=seed)
    with httpx.Client(timeout=30) as http:
        i = 0
        while not stop.is_set():
            for url in urls:
                http.post(f"{url}/v1/predict", json={"inputs": bodies[i % len(bodies)]})
            i += 1
