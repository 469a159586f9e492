"""Data versioning (DVC) and loading: the data version, verify, status, and validated splits.

The data version is the md5 DVC records in `data.dvc`. `verify_data` re-hashes every file the
way DVC does and names each mismatch, so a run never trains on data that is not the pinned one.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from runconfig import DataConfig

SPLITS = ("train", "validation", "test")


class DataError(ValueError):
    """Data that cannot be used as configured; the message names the file or split."""


class DataNotFound(DataError):
    """The DVC file (or what it pins) is not there: bad input (CLI exit 2), not a failed check."""


# --- DVC --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DvcPin:
    """What a .dvc file pins: the tracked path and its md5 (the data version)."""

    dvc_file: Path
    path: Path
    md5: str
    nfiles: int | None

    @property
    def version(self) -> str:
        return self.md5.removesuffix(".dir")


def read_pin(dvc_file: Path) -> DvcPin:
    if not dvc_file.is_file():
        raise DataNotFound(f"{dvc_file} not found: run `transflow data prepare` (or `dvc pull`) first")
    doc = yaml.safe_load(dvc_file.read_text()) or {}
    outs = doc.get("outs") or []
    if len(outs) != 1 or "md5" not in outs[0]:
        raise DataError(f"{dvc_file}: expected exactly one output with an md5")
    out = outs[0]
    return DvcPin(dvc_file, dvc_file.parent / out["path"], out["md5"], out.get("nfiles"))


def data_version(dvc_file: Path | None) -> str:
    """The md5 of the pinned data, or 'unversioned' when the config tracks no DVC file."""
    return read_pin(dvc_file).version if dvc_file else "unversioned"


def md5_file(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tree_entries(root: Path, layout: DvcLayout | None = None) -> list[dict[str, str]]:
    """DVC's listing of a directory: sorted {md5, relpath} of every file DVC tracks (DVC 3, plain md5): files
    and folders its `.dvcignore` ignores are left out, as `dvc add` leaves them out."""
    root = root.resolve()  # DVC walks absolute paths; a relative `data` must give the same relpaths
    files = layout.files(root) if layout else sorted(p for p in root.rglob("*") if p.is_file())
    return [{"md5": md5_file(p), "relpath": p.relative_to(root).as_posix()} for p in files]


def tree_md5(entries: list[dict[str, str]]) -> str:
    """The md5 DVC gives a directory: md5 of its sorted JSON listing, with '.dir' appended."""
    listing = sorted(entries, key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(listing, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"


@dataclass
class DvcLayout:
    """What DVC itself says about a repo (its own API, so the answer is DVC's): the cache directory configured in
    `.dvc/config`/`config.local` (`dvc cache dir …`), the `.dvcignore` rules, and the default remote."""

    root: Path
    cache: Path  # <cache dir>/files/md5
    repo: Any = None  # dvc.repo.Repo, or None outside a DVC repo

    def files(self, top: Path) -> list[Path]:
        if self.repo is None:
            return sorted(p for p in top.rglob("*") if p.is_file())
        found = []
        for folder, _, names in self.repo.dvcignore.walk(self.repo.fs, str(top.resolve())):
            found += [Path(folder) / n for n in names]
        return sorted(p for p in found if p.is_file())

    def has_remote(self) -> bool:
        return bool(self.repo is not None and self.repo.config.get("core", {}).get("remote"))


def dvc_layout(repo_root: Path) -> DvcLayout:
    """The repo's layout from DVC; outside a DVC repo, DVC's defaults (`.dvc/cache`, nothing ignored)."""
    default = DvcLayout(repo_root, repo_root / ".dvc" / "cache" / "files" / "md5")
    if not (repo_root / ".dvc").is_dir():
        return default
    from dvc.repo import Repo

    repo = Repo(str(repo_root.resolve()))
    return DvcLayout(repo_root, Path(repo.cache.local.path), repo)


def cache_object(repo_root: Path | DvcLayout, md5: str) -> Path:
    layout = repo_root if isinstance(repo_root, DvcLayout) else dvc_layout(repo_root)
    return layout.cache / md5[:2] / md5[2:]


@dataclass
class VerifyReport:
    version: str
    actual: str
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_data(dvc_file: Path, layout: DvcLayout | None = None) -> VerifyReport:
    """Re-hash the tracked directory (minus what `.dvcignore` ignores); name every changed, missing or extra
    file and corrupt cache object, looking in the cache directory DVC is configured with."""
    pin = read_pin(dvc_file)
    if not pin.path.is_dir():
        return VerifyReport(pin.version, "missing", [f"{pin.path}: directory missing (run `dvc pull`)"])
    layout = layout or dvc_layout(dvc_file.parent)
    entries = tree_entries(pin.path, layout)
    report = VerifyReport(pin.version, tree_md5(entries).removesuffix(".dir"))
    expected = _pinned_listing(layout, pin)
    if expected is None:
        if report.actual != pin.version:
            report.problems.append(
                f"{pin.path}: md5 {report.actual} != pinned {pin.version} (no DVC cache to name the files)"
            )
        return report
    actual = {e["relpath"]: e["md5"] for e in entries}
    for rel, md5 in sorted(expected.items()):
        if rel not in actual:
            report.problems.append(f"{pin.path / rel}: missing")
        elif actual[rel] != md5:
            report.problems.append(f"{pin.path / rel}: content changed (md5 {actual[rel]}, pinned {md5})")
        else:
            obj = cache_object(layout, md5)
            if obj.is_file() and md5_file(obj) != md5:
                report.problems.append(f"{obj}: DVC cache object for {pin.path / rel} is corrupted")
    report.problems += [f"{pin.path / rel}: not in the pinned version" for rel in sorted(set(actual) - set(expected))]
    return report


def _pinned_listing(layout: DvcLayout, pin: DvcPin) -> dict[str, str] | None:
    obj = cache_object(layout, pin.md5)
    if not obj.is_file():
        return None
    raw = obj.read_bytes()
    if hashlib.md5(raw).hexdigest() + ".dir" != pin.md5:
        raise DataError(f"{obj}: DVC cache listing for {pin.path} is corrupted")
    return {e["relpath"]: e["md5"] for e in json.loads(raw)}


def ensure_data(dvc_file: Path) -> VerifyReport:
    """verify_data, but a machine that lacks the pinned data (a fresh worker) first pulls it from the DVC remote.
    Only missing data is pulled: a changed or extra file is the user's work, never overwritten; it fails."""
    layout = dvc_layout(dvc_file.parent)
    report = verify_data(dvc_file, layout)
    missing_only = report.problems and all(p.endswith(("missing", "missing (run `dvc pull`)")) for p in report.problems)
    if report.ok or not missing_only or not layout.has_remote():
        return report
    dvc = shutil.which("dvc") or str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "dvc")
    _run([dvc, "pull", "--quiet", str(dvc_file.resolve())], dvc_file.parent)
    return verify_data(dvc_file, layout)


def dvc_track(data_dir: Path, repo_root: Path) -> DvcPin:
    """`dvc add` the data directory (writes `<dir>.dvc`) and push to the default remote if one is set."""
    dvc = shutil.which("dvc") or str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "dvc")
    rel = data_dir.resolve().relative_to(repo_root.resolve())
    _run([dvc, "add", "--quiet", str(rel)], repo_root)
    remote = subprocess.run([dvc, "remote", "default"], cwd=repo_root, capture_output=True, text=True)
    if remote.returncode == 0 and remote.stdout.strip():
        _run([dvc, "push", "--quiet", f"{rel}.dvc"], repo_root)
    return read_pin(repo_root / f"{rel}.dvc")


def _run(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DataError(f"`{' '.join(cmd)}` failed in {cwd}:\n{proc.stdout}{proc.stderr}")


# --- loading and validating splits ------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """Inputs (texts, image paths or arrays) and integer labels into `Dataset.classes`."""

    items: list[Any]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Dataset:
    classes: list[str]
    train: Split
    validation: Split
    test: Split
    skipped: int = 0

    def split(self, name: str) -> Split:
        return {"train": self.train, "validation": self.validation, "test": self.test}[name]


def read_raw_splits(cfg: DataConfig) -> tuple[dict[str, tuple[list[Any], list[str]]], int]:
    """Read each split's (items, label names) with the modality's reader; count skipped files."""
    if not cfg.path.exists():
        raise DataError(f"data.path {cfg.path} does not exist")
    from models.adapters import read_split

    raw, skipped = {}, 0
    for s in SPLITS:
        items, labels, n_bad = read_split(
            cfg.modality, cfg.path, s, cfg.format, cfg.text_column, cfg.label_column, cfg.skip_corrupt
        )
        raw[s], skipped = (items, labels), skipped + n_bad
    return raw, skipped


def load_dataset(cfg: DataConfig, seed: int = 0) -> Dataset:
    """Read, validate and (optionally) subsample the three splits; every error names the split or file."""
    raw, skipped = read_raw_splits(cfg)
    classes = _class_list(cfg, raw)
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    for name, (items, names) in raw.items():
        unknown = sorted(set(names) - set(index))
        if unknown:
            raise DataError(f"{cfg.path} {name}: labels {unknown[:10]} do not occur in train")
        splits[name] = Split(list(items), [index[n] for n in names])
    limits = {"train": cfg.train_limit, "validation": cfg.validation_limit, "test": cfg.test_limit}
    splits = {name: subsample(split, limits[name], seed) for name, split in splits.items()}
    return Dataset(classes, splits["train"], splits["validation"], splits["test"], skipped)


def _class_list(cfg: DataConfig, raw: dict[str, tuple[list[Any], list[str]]]) -> list[str]:
    for name, (items, _) in raw.items():
        if not items:
            raise DataError(f"{cfg.path} {name}: split is empty")
    seen = Counter(raw["train"][1])
    classes = list(cfg.labels) if cfg.labels else sorted(seen)
    empty = [c for c in classes if seen[c] == 0]
    if empty:
        raise DataError(f"{cfg.path} train: classes with no examples: {empty}")
    extra = sorted(set(seen) - set(classes))
    if extra:
        raise DataError(f"{cfg.path} train: labels {extra[:10]} are not in data.labels")
    if len(classes) < 2:
        raise DataError(f"{cfg.path} train: only one class ({classes}); classification needs at least two")
    return classes


def subsample(split: Split, limit: int | None, seed: int) -> Split:
    """A stratified, seeded subsample of at most `limit` examples (each class keeps at least one)."""
    if limit is None or limit >= len(split):
        return split
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(split.labels):
        by_class.setdefault(y, []).append(i)
    chosen: list[int] = []
    for members in by_class.values():
        rng.shuffle(members)
        share = max(1, round(limit * len(members) / len(split)))
        chosen += members[:share]
    chosen = sorted(chosen)
    return Split([split.items[i] for i in chosen], [split.labels[i] for i in chosen])


def class_balance(ds: Dataset) -> dict[str, dict[str, int]]:
    return {name: {ds.classes[y]: n for y, n in sorted(Counter(ds.split(name).labels).items())} for name in SPLITS}
