"""The layering, stated once and checked on every import of every product module (module-level and inside
functions alike): runconfig → flows → tasks → models / transflow_edge, nothing imports upward.

    runconfig        may import no project package, and no framework (pydantic + yaml only)
    flows            the only layer that may import flows
    tasks            ↛ flows
    models           ↛ flows, tasks, runconfig, prefect, mlflow, dvc (pure torch / transformers / torchvision)
    transflow_edge   ↛ any other project package, torch, transformers, prefect, mlflow, dvc, typer, rich
    mlflow           imported only by tasks/tracking.py and tasks/tracking_registry.py (the MLflow callers)
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

PROJECT = {"runconfig", "flows", "tasks", "models", "transflow_edge", "benchmarks", "tests"}
FORBIDDEN = {
    "runconfig": PROJECT - {"runconfig"} | {"torch", "prefect", "mlflow", "dvc", "transformers"},
    "flows": {"benchmarks", "tests"},
    "tasks": {"flows", "benchmarks", "tests"},
    "models": {"flows", "tasks", "runconfig", "benchmarks", "tests", "prefect", "mlflow", "dvc"},
    "transflow_edge": PROJECT - {"transflow_edge"}
    | {"torch", "torchvision", "transformers", "prefect", "mlflow", "dvc", "typer", "rich", "peft", "sklearn"},
}
ONLY_HERE = {"mlflow": {"tasks/tracking.py", "tasks/tracking_registry.py"}}


def package_of(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return "transflow_edge" if rel.parts[0] == "edge" else rel.parts[0]


def product_files() -> list[Path]:
    files = [p for folder in ("runconfig", "flows", "tasks", "models") for p in (ROOT / folder).rglob("*.py")]
    return files + list((ROOT / "edge").rglob("transflow_edge/**/*.py"))


def imported_roots(source: str) -> list[tuple[int, str]]:
    """(line, top-level package) of every import statement, wherever it stands (not only at module level)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def violations(files: list[Path]) -> list[str]:
    out = []
    for path in files:
        layer, rel = package_of(path), path.relative_to(ROOT).as_posix()
        for line, root in imported_roots(path.read_text()):
            if root in FORBIDDEN.get(layer, set()):
                out.append(f"{rel}:{line}: {layer} imports {root}")
            if root in ONLY_HERE and rel not in ONLY_HERE[root]:
                out.append(f"{rel}:{line}: {root} is imported only by {sorted(ONLY_HERE[root])}")
    return out


def test_no_layer_imports_upward_or_a_forbidden_framework() -> None:
    files = product_files()
    assert {package_of(p) for p in files} == {"runconfig", "flows", "tasks", "models", "transflow_edge"}
    assert len(files) > 40, "the scan must see the product"
    assert violations(files) == []


@pytest.mark.parametrize(
    ("folder", "source", "expected"),
    [
        ("tasks", "def f():\n    from flows.retrain import retrain\n", "tasks imports flows"),
        ("models", "import mlflow\n", "models imports mlflow"),
        ("models", "from runconfig import RunConfig\n", "models imports runconfig"),
        ("edge/transflow_edge", "import torch\n", "transflow_edge imports torch"),
        ("flows", "import mlflow.pyfunc\n", "mlflow is imported only by"),
    ],
)
def test_the_checker_sees_each_kind_of_violation(folder: str, source: str, expected: str) -> None:
    probe = ROOT / folder / "_layer_probe_tmp.py"
    probe.write_text(source)
    try:
        found = violations([probe])
    finally:
        probe.unlink()
    assert found and expected in found[0] and all("_layer_probe_tmp.py:" in f for f in found), found


def test_importing_the_packages_has_no_side_effects() -> None:
    """Importing flows (or any of our packages) sets no environment variable. The frameworks load first: torch
    and scikit-learn set their own OpenMP variables on import, which is not ours to judge."""
    code = (
        "import os, sys, torch, transformers, prefect, mlflow, typer, sklearn; before = dict(os.environ); "
        "import runconfig, flows, tasks, models, transflow_edge, flows.retrain, flows.cli; "
        "changed = sorted(k for k in os.environ if os.environ.get(k) != before.get(k)); "
        "print(','.join(changed)); sys.exit(1 if changed else 0)"
    )
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("PREFECT_", "DO_NOT_TRACK"))}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, f"importing changed {proc.stdout.strip()} {proc.stderr[-800:]}"


def test_the_edge_package_loads_no_heavy_framework_at_run_time() -> None:
    code = (
        "import sys, pkgutil, importlib, transflow_edge; "
        "[importlib.import_module(m.name) for m in pkgutil.walk_packages(transflow_edge.__path__, 'transflow_edge.')]; "
        "bad = [m for m in ('torch', 'transformers', 'mlflow', 'prefect', 'dvc', 'typer') if m in sys.modules]; "
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"the edge package imported {proc.stdout.strip()} {proc.stderr[-500:]}"
