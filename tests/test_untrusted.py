"""No pickle from untrusted places: the code never calls torch.load without weights_only=True and never
unpickles (which package may import what: tests/test_layers.py)."""

from __future__ import annotations

import re
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
