"""`transflow export MODEL@ALIAS --out DIR`: build the deployable bundle of any registered version."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from models.adapters import load_model_dir
from tasks.data import load_dataset
from tasks.export import export_and_log
from tasks.finetune import encode_splits
from tasks.registered_version import require_version, run_config, verify_same_data
from tasks.tracking import Tracker, resolve_tracking_uri


@flow(name="export")
def export_model(model_uri: str, out: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """Fetch the version and its run config, rebuild the model, export it on the same test split, tag it."""
    tracker = Tracker(resolve_tracking_uri(tracking_uri))
    name, version = tracker.resolve_version(model_uri if model_uri.startswith("models:/") else f"models:/{model_uri}")
    record = require_version(tracker, name, version)
    workdir = Path(out)
    cfg = run_config(tracker, record, workdir / "run")
    verify_same_data(cfg.data, record, allow_unversioned=True)
    source = tracker.training_model_uri(f"models:/{name}/{version}")  # the run's model/, not the pyfunc
    adapter, model, meta = load_model_dir(tracker.download(source, workdir / "registered"))
    dataset = load_dataset(cfg.data, seed=cfg.training.seed)
    encoded = encode_splits(adapter, dataset, ("test",))
    lineage = {k: v for k, v in record.tags.items() if not k.startswith(("onnx.", "bundle_", "exported"))}
    return export_and_log(
        tracker,
        record.run_id or "",
        {"name": name, "version": version, "lineage": lineage},
        model,
        adapter,
        encoded.batches(adapter, "test", cfg.training.eval_batch_size, sort=True),
        dataset.test.items,
        meta["classes"],
        cfg.export,
        workdir / "export",
        calibration_items=dataset.validation.items,  # the int8 ladder's static rungs calibrate on a slice of it
    )
