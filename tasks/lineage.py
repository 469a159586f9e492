"""Lineage: what a run must record so anyone can answer "which data and code trained this model"."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path

from tasks.data import data_version

TRACKED_LIBRARIES = (
    "torch",
    "torchvision",
    "transformers",
    "peft",
    "onnx",
    "onnxruntime",
    "mlflow",
    "prefect",
    "dvc",
    "scikit-learn",
    "numpy",
)


def git_state(repo: Path = Path(".")) -> tuple[str, bool]:
    """(commit, dirty): dirty means tracked files differ from the commit; 'unknown' outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False
    return commit, bool(status.strip())


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def collect_lineage(dvc_file: Path | None, config_hash: str, repo: Path = Path(".")) -> dict[str, str]:
    """Flat string tags (MLflow-ready): data version, git commit + dirty flag, config hash, versions."""
    commit, dirty = git_state(repo)
    tags = {
        "data_version": data_version(dvc_file),
        "git_commit": commit,
        "git_dirty": str(dirty).lower(),
        "config_hash": config_hash,
    }
    tags.update({f"version.{k}": v for k, v in library_versions().items()})
    return tags
