"""Lineage: what a run must record so anyone can answer "which data and code trained this model"."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from transflow_edge.bundle import BundleError, read_bundle

from tasks.data import data_version
from tasks.registered_version import RegistryError, require_model, require_version
from tasks.tracking import Tracker

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


# --- a version's lineage, read back --------------------------------------------------------------------------

LINEAGE_DEPTH = 5  # backbone of a backbone of …: bounded, so a cycle in the registry cannot recurse forever


def parse_target(target: str) -> tuple[str, str | None, str | None]:
    """`NAME@ALIAS`, `NAME/VERSION` or `models:/…` → (name, alias, version)."""
    ref = target.removeprefix("models:/")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return name, alias, None
    name, _, version = ref.rpartition("/")
    if name and version.isdigit():
        return name, None, version
    raise RegistryError(f"{target!r}: expected NAME@ALIAS or NAME/VERSION (e.g. tweets-sentiment@champion)")


def resolve_target(tracker: Tracker, target: str) -> tuple[str, str]:
    """`NAME@ALIAS` or `NAME/VERSION` → (name, version), the model and the alias checked to exist."""
    name, alias, version = parse_target(target)
    require_model(tracker, name)
    if alias:
        version = tracker.alias_version(name, alias)
        if version is None:
            raise RegistryError(f"{name} has no alias {alias!r}")
    return name, str(version)


def version_lineage(tracker: Tracker, target: str, depth: int = 0) -> dict[str, Any]:
    """bundle sha256 → model version → run → data version → git commit → backbone (→ the backbone's own)."""
    name, version = resolve_target(tracker, target)
    record = require_version(tracker, name, version)
    tags = record.tags
    out: dict[str, Any] = {
        "bundle_sha256": tags.get("bundle_sha256"),
        "model": name,
        "version": record.version,
        "aliases": sorted(record.aliases),
        "run_id": record.run_id,
        "data_version": tags.get("data_version"),
        "git_commit": tags.get("git_commit"),
        "git_dirty": tags.get("git_dirty"),
        "config_hash": tags.get("config_hash"),
        "backbone": tags.get("backbone"),
    }
    backbone = tags.get("backbone") or ""
    if backbone.startswith("models:/") and depth < LINEAGE_DEPTH:
        try:
            parent = version_lineage(tracker, backbone, depth + 1)
            parent["resolved_now"] = "@" in backbone  # an alias names today's version, not the one trained on
            out["backbone_lineage"] = parent
        except RegistryError as exc:
            out["backbone_lineage"] = {"error": str(exc)}
    return out


def bundle_lineage(bundle: Path, tracker: Tracker | None) -> dict[str, Any]:
    """Verify a bundle (dir or .tar.gz), read its manifest's lineage, and cross-check it with the registry."""
    with tempfile.TemporaryDirectory(prefix="transflow-lineage-") as tmp:
        try:
            verified = read_bundle(bundle, Path(tmp) / "bundle")
        except BundleError as exc:
            raise RegistryError(f"{bundle}: bundle fails verification: {exc}") from None
    manifest = verified.manifest
    lineage = manifest.get("lineage") or {}
    out: dict[str, Any] = {
        "bundle": str(bundle),
        "bundle_sha256": verified.sha256,
        "bundle_verified": True,
        "model": manifest.get("name"),
        "version": str(manifest.get("version")),
        **{k: lineage.get(k) for k in ("data_version", "git_commit", "git_dirty", "config_hash", "backbone")},
    }
    if tracker is None or not out["model"]:
        return out
    try:
        registry = version_lineage(tracker, f"{out['model']}/{out['version']}")
    except Exception as exc:  # lineage from the manifest alone is still an answer
        return out | {"registry": {"error": f"{type(exc).__name__}: {exc}"}}
    agrees = registry["bundle_sha256"] == verified.sha256
    out |= {"run_id": registry["run_id"], "aliases": registry["aliases"], "registry": {"agrees": agrees}}
    if not agrees:
        out["registry"]["registered_bundle_sha256"] = registry["bundle_sha256"]
    if "backbone_lineage" in registry:
        out["backbone_lineage"] = registry["backbone_lineage"]
    return out
