"""A registered model version as the registry steps need it: checked to exist, its verified bundle, the run's
config and proof that the data on disk is the data it was trained and tested on, and its evaluation on that data.

Every failure here is a `RegistryError` naming the version and what is wrong: nothing was changed.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from transflow_edge.bundle import Bundle, BundleError, safe_extract, verify_bundle

from models.adapters import load_model_dir
from models.trainer import scores
from runconfig import DataConfig, RunConfig
from tasks.data import DataError, load_dataset, verify_data
from tasks.finetune import Encoded
from tasks.registry_gate import Check
from tasks.tracking import CHALLENGER, Tracker, VersionRecord

CHAMPION = "champion"
BUNDLE_ARTIFACT = "bundle/bundle.tar.gz"  # where every export logs the version's bundle on its run


class RegistryError(ValueError):
    """A registered version that cannot be used as asked (unknown model or version, missing or tampered bundle,
    other labels, other data): nothing was changed."""


def require_model(tracker: Tracker, model: str) -> None:
    if not tracker.model_exists(model):
        raise RegistryError(f"no registered model named {model!r} in the registry")


def require_version(tracker: Tracker, model: str, version: str) -> VersionRecord:
    if not str(version).isdigit():
        raise RegistryError(f"{model}: version must be a number, got {version!r}")
    record = tracker.model_version(model, str(version))
    if record is None:
        known = ", ".join(tracker.version_numbers(model)) or "none"
        raise RegistryError(f"{model} has no version {version} (versions: {known})")
    if not record.run_id:
        raise RegistryError(f"{model} v{version} was not registered from a run: the gate needs the run's artifacts")
    return record


def resolve_challenger(tracker: Tracker, model: str, version: str | None) -> VersionRecord:
    require_model(tracker, model)
    if version is None:
        version = tracker.alias_version(model, CHALLENGER)
        if version is None:
            raise RegistryError(f"{model} has no '{CHALLENGER}' alias: name the version with --version")
    return require_version(tracker, model, str(version))


def label_set(record: VersionRecord) -> list[str]:
    try:
        classes = json.loads(record.tags["classes"])
    except (KeyError, json.JSONDecodeError):
        raise RegistryError(f"{record.name} v{record.version} has no valid 'classes' tag (a JSON list)") from None
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise RegistryError(f"{record.name} v{record.version}: 'classes' tag is not a JSON list of names")
    return classes


def same_labels(challenger: VersionRecord, champion: VersionRecord) -> Check:
    mine, theirs = label_set(challenger), label_set(champion)
    if set(mine) != set(theirs):
        raise RegistryError(
            f"{challenger.name} v{challenger.version} was trained on labels {mine} but champion "
            f"v{champion.version} on {theirs}: a different label set cannot replace the champion"
        )
    return Check("same_labels", True, f"same label set as champion v{champion.version}: {sorted(mine)}")


def fetch_verified_bundle(tracker: Tracker, record: VersionRecord, work: Path) -> tuple[Path, Bundle]:
    """The run's bundle.tar.gz, downloaded, safely extracted and verified, and the one the registry recorded:
    what promotion judges and what deploy ships are the same check."""
    where = f"{record.name} v{record.version}"
    expected = record.tags.get("bundle_sha256")
    tar = tracker.run_artifact(record.run_id or "", BUNDLE_ARTIFACT, work / f"bundle-v{record.version}.download")
    if tar is None:
        raise RegistryError(
            f"{where}: run {record.run_id} has no {BUNDLE_ARTIFACT}: export it first with "
            f"`transflow export {record.name}/{record.version} --out DIR`"
        )
    if not expected:
        raise RegistryError(f"{where} has no bundle_sha256 tag: re-export it with `transflow export`")
    dest = Path(tempfile.mkdtemp(prefix=f"bundle-v{record.version}-", dir=work)) / "bundle"
    try:
        bundle = verify_bundle(safe_extract(tar, dest))
    except BundleError as exc:
        raise RegistryError(f"{where}: bundle fails verification: {exc}") from None
    if bundle.sha256 != expected:
        raise RegistryError(
            f"{where}: bundle sha256 {bundle.sha256} is not the registered one ({expected}): "
            "the artifact changed after export"
        )
    return tar, bundle


def verify_version_bundle(tracker: Tracker, record: VersionRecord, work: Path) -> Check:
    """The gate's bundle check: verified, registered, and with the version's labels and default model."""
    where = f"{record.name} v{record.version}"
    _, bundle = fetch_verified_bundle(tracker, record, work)
    if sorted(bundle.json("labels.json")) != sorted(label_set(record)):
        raise RegistryError(f"{where}: bundle labels {bundle.json('labels.json')} differ from the version's")
    if record.tags.get("onnx.default_model", bundle.manifest["default_model"]) != bundle.manifest["default_model"]:
        raise RegistryError(f"{where}: bundle default model differs from the registry's onnx.default_model tag")
    return Check("bundle", True, f"bundle {bundle.sha256[:12]} verified, sha256 matches the registry")


def run_config(tracker: Tracker, record: VersionRecord, work: Path) -> RunConfig:
    """The version's run's resolved RunConfig: its data settings define the test split."""
    path = tracker.run_artifact(record.run_id or "", "config.json", work / f"config-v{record.version}")
    if path is None:
        raise RegistryError(f"{record.name} v{record.version}: run {record.run_id} has no config.json")
    try:
        return RunConfig.model_validate(json.loads(path.read_text()))
    except (ValidationError, json.JSONDecodeError) as exc:
        raise RegistryError(f"{record.name} v{record.version}: config.json is not a valid run config: {exc}") from None


def verify_same_data(data_cfg: DataConfig, record: VersionRecord, allow_unversioned: bool = False) -> Check:
    """The data on disk must be, byte for byte, the version the model was trained and tested on.

    The gate cannot compare two models on unversioned data; an export may (`allow_unversioned`), there being
    nothing to check it against."""
    pinned, dvc_file = record.tags.get("data_version"), data_cfg.dvc_file
    if (dvc_file is None or not pinned or pinned == "unversioned") and allow_unversioned:
        return Check("same_data", True, "unversioned data: not checked")
    if dvc_file is None or not pinned or pinned == "unversioned":
        raise RegistryError(
            f"{record.name} v{record.version} was trained on unversioned data: the gate cannot prove that both "
            "models are compared on the same test split"
        )
    try:
        report = verify_data(Path(dvc_file))
    except DataError as exc:
        raise RegistryError(f"cannot verify the data of {record.name} v{record.version}: {exc}") from None
    if report.version != pinned:
        raise RegistryError(
            f"{record.name} v{record.version} was trained on data {pinned} but {dvc_file} pins {report.version}: "
            "check out the matching data (git checkout + dvc checkout) to compare on the same test split"
        )
    if not report.ok:
        raise RegistryError(f"data on disk does not match {dvc_file}: " + "; ".join(report.problems[:5]))
    return Check("same_data", True, f"test split of data version {pinned} verified on disk")


@dataclass
class TestSplit:
    """The challenger's test split, shared by both evaluations."""

    items: list[Any]
    labels: list[int]
    classes: list[str]
    batch_size: int
    device: str


def load_test_split(cfg: RunConfig, device: str) -> TestSplit:
    try:
        dataset = load_dataset(cfg.data, seed=cfg.training.seed)
    except (DataError, ValueError) as exc:
        raise RegistryError(f"cannot load the challenger's test split: {exc}") from None
    test = dataset.test
    return TestSplit(test.items, test.labels, dataset.classes, cfg.training.eval_batch_size, device)


def evaluate_version(tracker: Tracker, record: VersionRecord, split: TestSplit, work: Path) -> dict[str, float]:
    model_dir = tracker.download(f"models:/{record.name}/{record.version}", work / f"model-v{record.version}")
    return evaluate_model_dir(model_dir, split)


def evaluate_model_dir(model_dir: Path, split: TestSplit) -> dict[str, float]:
    """Accuracy, macro-F1 and loss of a saved model on the split, its logits reordered to the split's classes.

    No progress bar: the gate runs inside other flows and in parallel threads (one Rich live display each)."""
    adapter, model, meta = load_model_dir(model_dir)
    if sorted(meta["classes"]) != sorted(split.classes):
        raise RegistryError(f"{model_dir}: model classes {meta['classes']} differ from the data's {split.classes}")
    order = torch.as_tensor([meta["classes"].index(c) for c in split.classes])
    encoded = Encoded(([], []), ([], []), (adapter.encode(split.items), split.labels))
    model.to(split.device).eval()
    logits, labels = [], []
    with torch.inference_mode():
        for inputs, y in encoded.batches(adapter, "test", split.batch_size, sort=True):
            out = model(**{k: v.to(split.device) for k, v in inputs.items()}).float().cpu()
            logits.append(out[:, order])
            labels.append(y)
    all_logits, all_labels = torch.cat(logits), torch.cat(labels)
    loss = F.cross_entropy(all_logits, all_labels).item()
    return {k: round(v, 6) for k, v in scores(all_labels.numpy(), np.asarray(all_logits)).items()} | {
        "loss": round(loss, 6)
    }
