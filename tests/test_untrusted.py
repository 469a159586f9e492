"""No pickle from untrusted places: the code never calls torch.load without weights_only=True, never
unpickles, and the edge package never imports torch, transformers, mlflow or prefect."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

PRODUCT = ["flows", "tasks", "models", "edge", "benchmarks"]
CALL = "torch." + "load("  # spelled in two parts so this file does not match its own scan


def python_files() -> list[Path]:
    return [p for folder in PRODUCT for p in (ROOT / folder).rglob("*.py")]


def test_every_torch_load_is_weights_only() -> None:
    offenders = []
    for path in python_files():
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if CALL in line and "weights_only=True" not in line:
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, offenders
    assert any(CALL in p.read_text() for p in python_files()), "the scan must see the one legitimate call"


def test_no_pickle_deserialisation_in_product_code() -> None:
    pattern = re.compile(r"\b(pickle|cloudpickle|dill|joblib)\.(load|loads)\(|allow_pickle=True")
    offenders = [
        f"{p.relative_to(ROOT)}:{n}"
        for p in python_files()
        for n, line in enumerate(p.read_text().splitlines(), start=1)
        if pattern.search(line)
    ]
    assert not offenders, offenders


def test_edge_imports_no_heavy_framework() -> None:
    code = (
        "import sys, transflow_edge.server, transflow_edge.bundle, transflow_edge.preprocess; "
        "bad = [m for m in ('torch', 'transformers', 'mlflow', 'prefect') if m in sys.modules]; "
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, f"edge imported {proc.stdout.strip()} {proc.stderr[-500:]}"
