"""The candidate report: one page that decides a promotion. Challenger vs champion on the same test split (metric
difference with a paired bootstrap CI, McNemar, per-class deltas, confusion matrices, baselines), the export (fp32
parity, every ladder rung, what ships and why), speed and size on the bundle as it ships, lineage, the model card.

Written as report.html (self-contained), report.md and report.json beside the bundle and logged to the version's
run under `report/`. Order: the bundle is built and hashed first; the report cites the bundle's sha256, and the
report's own sha256 goes to the version's tags and the promotion decision, never into the bundle's manifest. The
manifest is the bundle's identity and a report is relative to a champion that changes (`transflow report
--against`), so the bundle must not depend on it. What is intrinsic to the bundle (its ladder, per-class int8
scores) is in the manifest.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.adapters import load_model_dir
from models.backbone import Adapter, TransferModel
from models.batching import Batches, by_length
from tasks.evaluate import load_test_split
from tasks.registered_version import (
    CHAMPION,
    RegistryError,
    fetch_verified_bundle,
    label_set,
    require_version,
    run_config,
    verify_same_data,
)
from tasks.registry_gate import Check, baseline_check, compare, significance_check, tag_checks
from tasks.report_render import plots, render_html, render_markdown
from tasks.report_speed import cpu_info, file_sizes, measure_latency
from tasks.report_stats import compare_predictions
from tasks.tracking import Tracker, VersionRecord

REPORT_DIR = "report"  # artifact folder on the version's run, and folder beside the bundle
TRAINING_JSON = "training.json"  # the run's results (flows.train writes it; tasks cannot import flows)
MODEL_ARTIFACT = "model"  # the run's fine-tuned model directory (flows.train.MODEL_ARTIFACT)
FILES = ("report.html", "report.md", "report.json")


def predict_in_order(
    model: TransferModel, adapter: Adapter, items: list[Any], batch_size: int, model_classes: list[str],
    split_classes: list[str],
) -> np.ndarray:  # fmt: skip
    """Argmax predictions in the split's example order and class order (the pairing both statistics need);
    batches are length-sorted for speed and put back in order."""
    encoded = adapter.encode(items)
    order = by_length(encoded, adapter.length)
    batches = Batches(encoded, [0] * len(items), batch_size, lambda rows: adapter.collate(rows, False), order)
    remap = torch.as_tensor([model_classes.index(c) for c in split_classes])
    model = model.cpu().eval()
    out = []
    with torch.inference_mode():
        for inputs, _ in batches:
            out.append(model(**inputs).float()[:, remap].argmax(-1).numpy())
    preds = np.empty(len(items), dtype=np.int64)
    preds[np.asarray(order, dtype=np.int64)] = np.concatenate(out) if out else []
    return preds


def gate_lines(
    tags: Mapping[str, str], comparison: dict[str, Any], champion: str | None, settings: dict[str, Any]
) -> list[Check]:
    """The report's verdict lines, computed by the gate's own functions (`tasks.registry_gate`), so a refusal
    can name the line: onnx_parity, int8, beats_baselines, beats_champion, significant."""
    metric = comparison["metric"]
    theirs = comparison["champion"][metric] if comparison["champion"] else None
    report_tags = significance_tags(comparison, champion)
    return [
        *tag_checks(tags, settings["int8_budget_pt"]),
        baseline_check(tags, settings["require_beats_baselines"]),
        compare(metric, comparison["challenger"][metric], theirs, settings["margin"]),
        significance_check(report_tags, champion, settings["require_significance"], settings["level"]),
    ]


def significance_tags(comparison: dict[str, Any], champion: str | None) -> dict[str, str]:
    """What the version records of the report's comparison: the gate's `significant` check reads these."""
    boot, test = comparison.get("bootstrap"), comparison.get("mcnemar")
    if champion is None or boot is None or test is None:
        return {"report.against_version": "none"}
    return {
        "report.against_version": champion,
        "report.metric": comparison["metric"],
        "report.difference": f"{boot['difference']:.6f}",
        "report.ci_low": f"{boot['low']:.6f}",
        "report.ci_high": f"{boot['high']:.6f}",
        "report.level": f"{comparison['level']:g}",
        "report.mcnemar_p": f"{test['p_value']:.6g}",
        "report.significant": str(comparison["significant"]).lower(),
    }


def assemble(
    *,
    header: dict[str, Any],
    comparison: dict[str, Any],
    lines: list[Check],
    training: dict[str, Any] | None,
    tags: Mapping[str, str],
    manifest: dict[str, Any],
    bundle_sha256: str,
    latency: list[dict[str, Any]],
    sizes: list[dict[str, Any]],
    lineage: dict[str, Any],
    model_card: str,
) -> dict[str, Any]:
    """The report's numbers as one JSON-ready dict (what report.json holds and both renderings read)."""
    training = training or {}
    return {
        "header": header,
        "verdict": [asdict(c) for c in lines],
        "comparison": comparison,
        "baselines": {
            "passed": tags.get("baselines.passed"),
            "detail": tags.get("baselines.detail"),
            "scores": training.get("baselines"),
            "check": training.get("baseline_check"),
            "selected_stage": training.get("selected_stage"),
        },
        "export": {
            "default_model": manifest.get("default_model"),
            "parity": manifest.get("parity"),
            "int8": manifest.get("int8"),
            "ladder": manifest.get("ladder"),
            "metrics": manifest.get("metrics"),
        },
        "speed": {"cpu": cpu_info(), "latency": latency, "sizes": sizes},
        "lineage": lineage | {"bundle_sha256": bundle_sha256},
        "model_card": model_card,
    }


def write_report(report: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """report.json, report.md, report.html and the plots as SVG files; returns paths and the HTML page's sha256."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out_dir / "report.md").write_text(render_markdown(report))
    svgs = plots(report)
    for name, svg in svgs.items():  # the same plots as files: MLflow's artifact view shows them
        (out_dir / name).write_text(svg)
    html = render_html(report, svgs)
    (out_dir / "report.html").write_text(html)
    return {"dir": str(out_dir), "html": str(out_dir / "report.html"),
            "sha256": hashlib.sha256(html.encode()).hexdigest(), "bytes": len(html.encode())}  # fmt: skip


def build_version_report(
    tracker: Tracker,
    model_name: str,
    version: str,
    out_dir: Path,
    against: str = CHAMPION,
    *,
    work: Path,
    live: tuple[TransferModel, Adapter, np.ndarray | None] | None = None,
    log: bool = True,
) -> dict[str, Any]:
    """Build the report of `version` against the version alias `against` points at (none: a first champion) on the
    challenger's test split, verified on disk; log it to the version's run and tag the version. `live`: the model
    in memory, its adapter and (optionally) its test predictions in split order, from the retraining flow."""
    started = time.perf_counter()
    record = require_version(tracker, model_name, version)
    classes = label_set(record)
    cfg = run_config(tracker, record, work)
    verify_same_data(cfg.data, record)
    split = load_test_split(cfg, "cpu")
    y = np.asarray(split.labels, dtype=np.int64)
    champion = _other(tracker, model_name, against, record)
    model, adapter, meta = (*live[:2], {"classes": classes}) if live else _load(tracker, record, work)
    mine = live[2] if live and live[2] is not None and len(live[2]) == len(y) else None
    if mine is None:  # no predictions from the training run: one test pass of the challenger
        mine = predict_in_order(model, adapter, split.items, split.batch_size, meta["classes"], split.classes)
    theirs = None
    if champion is not None:
        c_model, c_adapter, c_meta = _load(tracker, champion, work)
        theirs = predict_in_order(c_model, c_adapter, split.items, split.batch_size, c_meta["classes"], split.classes)
    level = cfg.registry.significance_level
    comparison = compare_predictions(y, mine, theirs, split.classes, cfg.evaluation.metric, level, cfg.training.seed)
    stats_s = time.perf_counter() - started
    settings = {"int8_budget_pt": cfg.export.int8_budget_pt, "require_beats_baselines":
                cfg.registry.require_beats_baselines, "margin": cfg.registry.margin,
                "require_significance": cfg.registry.require_significance, "level": level}  # fmt: skip
    champion_version = champion.version if champion else None
    lines = gate_lines(record.tags, comparison, champion_version, settings)
    _, bundle = fetch_verified_bundle(tracker, record, work)
    latency = measure_latency(model, bundle.root, adapter, split.items)
    training_path = tracker.run_artifact(record.run_id or "", TRAINING_JSON, work / f"training-v{version}")
    header = {"model": model_name, "version": version, "against": against, "champion_version": champion_version,
              "metric": cfg.evaluation.metric, "test_size": len(y), "data_version": record.tags.get("data_version"),
              "built": datetime.now(UTC).isoformat(timespec="seconds"), "run_id": record.run_id}  # fmt: skip
    card = bundle.path("README.md").read_text() if (bundle.root / "README.md").is_file() else ""
    report = assemble(
        header=header, comparison=comparison, lines=lines,
        training=json.loads(training_path.read_text()) if training_path else None, tags=record.tags,
        manifest=bundle.manifest, bundle_sha256=bundle.sha256, latency=latency,
        sizes=file_sizes(bundle.root, bundle.manifest), lineage=_lineage(record), model_card=card,
    )  # fmt: skip
    report["header"]["build_seconds"] = {"statistics": round(stats_s, 2)}
    report["header"]["build_seconds"]["total"] = round(time.perf_counter() - started, 2)
    written = write_report(report, out_dir)
    if log:
        tracker.log_artifacts(record.run_id or "", out_dir, REPORT_DIR)
        uri = f"runs:/{record.run_id}/{REPORT_DIR}/report.html"
        tracker.tag_version(model_name, version, significance_tags(comparison, champion_version) | {
            "report.uri": uri, "report.sha256": written["sha256"]})  # fmt: skip
        written["uri"] = uri
    return written | {"significant": comparison["significant"], "against_version": champion_version,
                      "seconds": report["header"]["build_seconds"]["total"]}  # fmt: skip


def _other(tracker: Tracker, model_name: str, alias: str, record: VersionRecord) -> VersionRecord | None:
    """The version to compare with: `alias`'s version, or None (no champion yet, or the version is the champion
    itself and there is nothing to compare with)."""
    version = alias if alias.isdigit() else tracker.alias_version(model_name, alias)
    if version is None or version == record.version:
        return None
    other = require_version(tracker, model_name, version)
    if sorted(label_set(other)) != sorted(label_set(record)):
        raise RegistryError(f"{model_name} v{version} has other labels than v{record.version}: nothing to compare")
    return other


def _load(tracker: Tracker, record: VersionRecord, work: Path) -> tuple[Any, Any, dict[str, Any]]:
    # the run's training-format model dir (what `models:/` holds may be a pyfunc over the bundle instead)
    model_dir = tracker.download(f"runs:/{record.run_id}/{MODEL_ARTIFACT}", work / f"model-v{record.version}")
    adapter, model, meta = load_model_dir(model_dir)
    return model, adapter, meta


def _lineage(record: VersionRecord) -> dict[str, Any]:
    keys = ("data_version", "git_commit", "git_dirty", "config_hash", "backbone", "backbone_version", "run_id")
    lineage = {k: record.tags.get(k) for k in keys if record.tags.get(k) is not None}
    lineage["run_id"] = record.run_id
    lineage["libraries"] = {k[8:]: v for k, v in record.tags.items() if k.startswith("version.")}
    return lineage
