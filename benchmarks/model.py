"""Which model the benchmarks measure: always named, never "the newest directory under runs/".

--model RUN_DIR      a retrain run directory: config.json, model/ and export/bundle/ (what `make demo` leaves)
--model BUNDLE       a bundle directory (manifest.json) or a bundle .tar.gz: enough for the ONNX-only benchmarks
--model NAME@ALIAS   a registered version (or models:/NAME/N): its run's config.json, model/ and verified bundle,
                     downloaded once into runs/bench-models/NAME-vN/ (tracking URI: MLFLOW_TRACKING_URI or
                     the local store)
(no --model)         the demo's run: the directory configs/text-tweets.yaml trains into on the data version
                     data.dvc pins, whatever else ran since

python -m benchmarks.model [MODEL]     print what MODEL resolves to (or the one-line reason it does not)
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from transflow_edge.bundle import BundleError, read_bundle, verify_bundle

from benchmarks.common import ROOT
from runconfig import load_config
from tasks.data import DataError, data_version
from tasks.tracking import Tracker, resolve_tracking_uri, tracking_errors

DEMO_CONFIG = ROOT / "configs" / "text-tweets.yaml"
CACHE = ROOT / "runs" / "bench-models"  # registered versions and unpacked archives, reused across runs
BUNDLE = Path("export") / "bundle"  # a run directory's bundle
HINT = "name one with --model RUN_DIR | BUNDLE | NAME@ALIAS"


@dataclass(frozen=True)
class MeasuredModel:
    """A model to measure: its verified bundle, and the run directory (config + torch model) when there is one."""

    named: str  # as the user named it, for the report
    bundle: Path
    run_dir: Path | None = None

    @property
    def local(self) -> Path:
        """The local path that names the same model to another process (`--model`)."""
        return self.run_dir or self.bundle

    def require_run_dir(self, benchmark: str) -> Path:
        if self.run_dir is None:
            raise SystemExit(
                f"{benchmark} compares the torch model with its ONNX export, so it needs a run directory "
                f"(config.json, model/, {BUNDLE}/), not only the bundle {self.bundle}: {HINT.replace('| BUNDLE ', '')}"
            )
        return self.run_dir


def resolve_model(spec: str | None) -> MeasuredModel:
    """`spec` as described in the module docstring; SystemExit with one line naming what is missing."""
    if spec is None:
        return demo_model()
    path = Path(spec)
    if path.exists():
        return model_at(path, spec)
    if "@" in spec or spec.startswith("models:/"):
        return registered_model(spec)
    raise SystemExit(f"--model {spec}: no such run directory or bundle, and not NAME@ALIAS")


def demo_run_dir(config: Path = DEMO_CONFIG) -> Path:
    """Where `config` trains on the data version its DVC file pins (the same path the retrain flow uses)."""
    cfg = load_config(config)
    dvc_file = cfg.data.dvc_file and ROOT / cfg.data.dvc_file  # config paths are relative to the repository root
    try:
        version = data_version(dvc_file)
    except DataError as exc:
        raise SystemExit(f"the demo's run cannot be located: {exc}; or {HINT}") from None
    workdir = cfg.workdir(version)
    return workdir if workdir.is_absolute() else ROOT / workdir


def demo_model(config: Path = DEMO_CONFIG) -> MeasuredModel:
    run_dir = demo_run_dir(config)
    if not (run_dir / BUNDLE / "manifest.json").is_file():
        raise SystemExit(
            f"the demo's model {shown(run_dir / BUNDLE)} (what {shown(config)} trains on the pinned data) is not "
            f"there: run `make demo`, or {HINT}"
        )
    return model_at(run_dir, f"{shown(run_dir)} (the demo's run)")


def shown(path: Path) -> Path:
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def model_at(path: Path, named: str) -> MeasuredModel:
    """A run directory, a bundle directory or a bundle archive, verified against its manifest."""
    try:
        if (path / BUNDLE / "manifest.json").is_file():
            return MeasuredModel(named, verify_bundle(path / BUNDLE).root, path)
        if path.is_dir():
            return MeasuredModel(named, verify_bundle(path).root)
        return MeasuredModel(named, unpacked(path))
    except BundleError as exc:
        why = f"not a run directory (no {BUNDLE}/manifest.json) or a valid bundle"
        raise SystemExit(f"--model {named}: {why}: {exc}") from None


def unpacked(archive: Path) -> Path:
    """A bundle archive unpacked (safely) once per content into the cache; the child processes share it."""
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()[:16]
    dest = CACHE / f"bundle-{digest}"
    if not dest.is_dir():
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            read_bundle(archive, Path(tmp) / "bundle")
            (Path(tmp) / "bundle").rename(dest)
    return verify_bundle(dest).root


def registered_model(spec: str) -> MeasuredModel:
    """A registered version as a run directory under the cache: config.json, model/ and its verified bundle."""
    # Imported here, not at the top: they load torch and Prefect, which only this form needs (the edge benchmark
    # measures a bundle in a process that should not carry them; the runner's own process should not import Prefect).
    from flows.train import MODEL_ARTIFACT
    from tasks.registered_version import RegistryError, fetch_verified_bundle, require_version, run_config

    tracker = Tracker(resolve_tracking_uri(None))
    try:
        name, version = tracker.resolve_version(spec if spec.startswith("models:/") else f"models:/{spec}")
        record = require_version(tracker, name, version)
        run_dir = CACHE / f"{name}-v{version}"
        if not (run_dir / BUNDLE / "manifest.json").is_file():
            CACHE.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
                work = Path(tmp)
                _, bundle = fetch_verified_bundle(tracker, record, work)
                staged = work / "run"
                (staged / "export").mkdir(parents=True)
                shutil.copytree(bundle.root, staged / BUNDLE)
                (staged / "config.json").write_text(run_config(tracker, record, work).model_dump_json(indent=2))
                tracker.download(f"runs:/{record.run_id}/{MODEL_ARTIFACT}", staged)
                shutil.rmtree(run_dir, ignore_errors=True)
                staged.rename(run_dir)
    except (RegistryError, *tracking_errors()) as exc:
        raise SystemExit(f"--model {spec}: {exc}") from None
    return model_at(run_dir, f"{spec} ({name} v{version})")


def main(argv: list[str] | None = None) -> dict[str, str]:
    """Print what MODEL resolves to; the runner calls this in a process of its own (a registered model loads
    MLflow, torch and Prefect, which the runner's process keeps out of)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=None, help="RUN_DIR, BUNDLE or NAME@ALIAS (default: the demo's)")
    model = resolve_model(parser.parse_args(argv).model)
    print(f"{model.named}: bundle {model.bundle}, run directory {model.run_dir or '– (bundle only)'}")
    return {"named": model.named, "local": str(model.local)}


if __name__ == "__main__":
    main()
