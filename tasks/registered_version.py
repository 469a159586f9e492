"""A registered model version as the registry steps need it: checked to exist, its verified bundle, the run's
config and proof that the data on disk is the data it was trained and tested on (its re-evaluation on that data:
`tasks.evaluate.evaluate_version`). Light on purpose: no torch, so the deploy flow can use it.

Every failure here is a `RegistryError` naming the version and what is wrong: nothing was changed.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from pydantic import ValidationError
from transflow_edge.bundle import Bundle, BundleError, safe_extract, verify_bundle

from runconfig import DataConfig, RunConfig
from tasks.data import DataError, verify_data
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
            f"{where} has no bundle artifact (run {record.run_id} has no {BUNDLE_ARTIFACT}): export it first with "
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
            f"{where}: bundle sha256 {bundle.sha256} is not the registered one: it does not match the version's "
            f"bundle_sha256 tag {expected} (the artifact changed after export)"
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
