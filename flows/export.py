"""`transflow export MODEL@ALIAS --out DIR`: build the deployable bundle of any registered version."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow

from flows.config import RunConfig
from models.adapters import load_model_dir
from tasks.data import DataError, data_version, load_dataset
from tasks.export import build_bundle, report_dict, version_tags
from tasks.tracking import Tracker, resolve_tracking_uri


@flow(name="export")
def export_model(model_uri: str, out: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """Fetch the version and its run config, rebuild the model, export it on the same test split, tag it."""
    tracker = Tracker(resolve_tracking_uri(tracking_uri))
    name, version = tracker.resolve_version(model_uri if model_uri.startswith("models:/") else f"models:/{model_uri}")
    record = tracker.client.get_model_version(name, version)
    workdir = Path(out)
    model_dir = tracker.download(f"models:/{name}/{version}", workdir / "registered")
    config_path = tracker.download(f"runs:/{record.run_id}/config.json", workdir / "run")
    cfg = RunConfig.model_validate(json.loads(config_path.read_text()))
    pinned, current = record.tags.get("data_version"), data_version(cfg.data.dvc_file)
    if pinned and pinned != current:
        raise DataError(
            f"{name} v{version} was trained on data {pinned} but {cfg.data.dvc_file} pins {current}: "
            "check out the matching data (git checkout + dvc checkout) to export on the same test split"
        )
    adapter, model, meta = load_model_dir(model_dir)
    dataset = load_dataset(cfg.data, seed=cfg.training.seed)
    test = dataset.test
    from tasks.finetune import encode_splits

    encoded = encode_splits(adapter, dataset, ("test",))
    lineage = {k: v for k, v in record.tags.items() if not k.startswith(("onnx.", "bundle_", "exported"))}
    report = build_bundle(
        model,
        adapter,
        encoded.batches(adapter, "test", cfg.training.eval_batch_size, sort=True),
        test.items,
        meta["classes"],
        {"name": name, "version": version, "lineage": lineage},
        workdir / "export",
        cfg.export.opset,
        cfg.export.int8,
        cfg.export.int8_budget_pt,
    )
    tracker.log_artifacts(record.run_id, Path(report.bundle_tar), "bundle")  # where deploy and promote look
    tracker.tag_version(name, version, version_tags(report))
    return report_dict(report)
