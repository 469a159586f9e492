"""The edge distribution installs and serves alone: a fresh virtual environment gets only `./edge` (pinned by
requirements/constraints.txt), `import torch` fails there, and its `transflow-edge serve` answers predictions
for a real bundle. Slow: pip resolves and installs ~40 packages (from pip's cache when it is warm)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.edge_fixtures import SENTENCES, build_text_bundle, free_port

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "prefect", "mlflow", "dvc", "typer")


def test_edge_distribution_installs_and_serves_without_torch(tmp_path: Path) -> None:
    source = tmp_path / "edge-src"  # a copy: building the wheel must not litter the checkout
    shutil.copytree(ROOT / "edge", source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    started = time.monotonic()
    constraints = str(ROOT / "requirements" / "constraints.txt")
    # cwd elsewhere: `python -m pip` run in the checkout would see its transflow.egg-info
    subprocess.run([*pip, "-c", constraints, str(source)], cwd=tmp_path, check=True, timeout=900)
    install_s = time.monotonic() - started
    python = str(venv / "bin" / "python")
    for module in HEAVY:
        probe = subprocess.run([python, "-c", f"import {module}"], cwd=tmp_path, capture_output=True, text=True)
        assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr, module

    bundle = build_text_bundle(tmp_path / "bundle")
    port, log = free_port(), tmp_path / "server.log"
    command = [str(venv / "bin" / "transflow-edge"), "serve", "--bundle", str(bundle), "--port", str(port)]
    with log.open("w") as out:
        proc = subprocess.Popen([*command, "--threads", "1"], cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        answer = httpx.post(f"{url}/v1/predict", json={"inputs": SENTENCES}, timeout=30)
        assert answer.status_code == 200 and len(answer.json()["predictions"]) == len(SENTENCES)
        assert httpx.get(f"{url}/v2/health/ready", timeout=5).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    size_mb = sum(p.stat().st_size for p in venv.rglob("*") if p.is_file()) / 1e6
    print(f"edge venv: installed in {install_s:.0f} s, {size_mb:.0f} MB")
