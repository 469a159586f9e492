"""Data preparation determinism, dedup/leakage, DVC verify on corrupted copies, user-data validation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from runconfig import DataConfig
from tasks.data import DataError, load_dataset, read_pin, tree_entries, tree_md5, verify_data
from tasks.demo_datasets import dedup_key, dedup_tweets, prepare_all
from tests.conftest import ROOT, dvc_repo_with, write_jsonl


def test_prepare_is_byte_identical_and_matches_committed_data_dvc(prepared_data: Path, tmp_path: Path) -> None:
    again = tmp_path / "data"
    prepare_all(again)
    first, second = tree_entries(prepared_data), tree_entries(again)
    assert first == second
    committed = read_pin(ROOT / "data.dvc")
    assert tree_md5(first) == committed.md5, "prepared data differs from the version pinned in data.dvc"
    assert len(first) == committed.nfiles


def test_tweets_have_no_duplicates_within_or_across_splits(prepared_data: Path) -> None:
    seen: dict[str, str] = {}
    for split in ("train", "validation", "test"):
        for line in (prepared_data / "tweets" / f"{split}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            key = dedup_key(rec["text"])
            assert key not in seen, f"{rec['text']!r} in {split} and {seen.get(key)}"
            seen[key] = split
            assert rec["text"] == " ".join(rec["text"].split()), "whitespace not normalised"
    assert len(seen) > 30_000


def test_dedup_merges_retweets_case_and_links_and_votes_labels() -> None:
    rows = [
        ("Great flight today http://t.co/abc", "positive", 0.9),
        ("RT @fan: great FLIGHT today http://t.co/xyz", "positive", 0.5),
        ("great flight today", "neutral", 0.4),
        ("a different tweet", "negative", 1.0),
    ]
    out = dedup_tweets(rows)
    assert out == [("Great flight today http://t.co/abc", "positive"), ("a different tweet", "negative")]


def test_splits_are_stratified(prepared_data: Path) -> None:
    ds = load_dataset(DataConfig(modality="text", path=prepared_data / "tweets", dvc_file=None))
    shares = [np.bincount(ds.split(s).labels) / len(ds.split(s)) for s in ("train", "validation", "test")]
    assert np.abs(shares[0] - shares[1]).max() < 0.01 and np.abs(shares[0] - shares[2]).max() < 0.01


def test_image_datasets_load(prepared_data: Path) -> None:
    digits = load_dataset(DataConfig(modality="image", path=prepared_data / "digits", dvc_file=None))
    assert digits.classes == [str(i) for i in range(10)]
    assert len(digits.train) + len(digits.validation) + len(digits.test) == 1797
    fashion = load_dataset(DataConfig(modality="image", path=prepared_data / "fashion-mnist", dvc_file=None))
    assert len(fashion.classes) == 10 and len(fashion.test) == 10_000
    assert fashion.train.items[0].shape == (28, 28) and fashion.train.items[0].dtype == np.uint8


# --- verify against DVC -----------------------------------------------------------------------


@pytest.fixture
def dvc_repo(prepared_data: Path, tmp_path: Path) -> Path:
    """A real git + DVC repo holding a copy of the digits, tracked with `dvc add`."""
    return dvc_repo_with(prepared_data / "digits", tmp_path / "repo")


def test_verify_passes_on_the_pinned_copy(dvc_repo: Path) -> None:
    report = verify_data(dvc_repo / "data.dvc")
    assert report.ok, report.problems
    assert (
        report.version
        == report.actual
        == yaml.safe_load((dvc_repo / "data.dvc").read_text())["outs"][0]["md5"].removesuffix(".dir")
    )


def test_verify_names_flipped_truncated_missing_and_extra_files(dvc_repo: Path) -> None:
    data = dvc_repo / "data"
    flipped, truncated = data / "train/3/0003.png", sorted((data / "test/5").iterdir())[0]
    raw = bytearray(flipped.read_bytes())
    raw[40] ^= 0xFF
    flipped.write_bytes(bytes(raw))
    truncated.write_bytes(truncated.read_bytes()[:10])
    shutil.rmtree(data / "validation")
    (data / "train/3/extra.png").write_bytes(b"x")
    report = verify_data(dvc_repo / "data.dvc")
    text = "\n".join(report.problems)
    assert not report.ok
    assert f"{flipped.relative_to(dvc_repo)}: content changed" in text.replace(str(dvc_repo) + "/", "")
    assert truncated.name in text
    assert "validation" in text and "missing" in text
    assert "extra.png: not in the pinned version" in text


def test_verify_detects_a_corrupted_dvc_cache_object(dvc_repo: Path) -> None:
    objects = [p for p in (dvc_repo / ".dvc/cache/files/md5").rglob("*") if p.is_file() and p.suffix != ".dir"]
    victim = objects[0]
    victim.chmod(0o644)
    victim.write_bytes(b"corrupt")
    report = verify_data(dvc_repo / "data.dvc")
    assert any("cache object" in p and "corrupted" in p for p in report.problems)


def test_verify_without_data_or_dvc_file_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        verify_data(tmp_path / "data.dvc")


# --- user data validation ---------------------------------------------------------------------


def text_cfg(path: Path, **kw: object) -> DataConfig:
    return DataConfig(modality="text", path=path, dvc_file=None, **kw)


def test_user_jsonl_and_csv_load_with_custom_columns(tiny_text_data: Path, tmp_path: Path) -> None:
    ds = load_dataset(text_cfg(tiny_text_data))
    assert ds.classes == ["neg", "pos"] and len(ds.train) == 24
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    for split in ("train", "dev", "test"):
        (csv_dir / f"{split}.csv").write_text('review,stars\n"good, really",5\nbad,1\nok,5\n')
    ds = load_dataset(text_cfg(csv_dir, text_column="review", label_column="stars"))
    assert ds.classes == ["1", "5"] and ds.train.items[0] == "good, really"


def test_missing_split_is_named(tiny_text_data: Path) -> None:
    (tiny_text_data / "test.jsonl").unlink()
    with pytest.raises(ValueError, match="missing split 'test'"):
        load_dataset(text_cfg(tiny_text_data))


def test_label_absent_from_train_is_an_error(tiny_text_data: Path) -> None:
    write_jsonl(tiny_text_data / "test.jsonl", [{"text": "meh", "label": "neutral"}, {"text": "x", "label": "pos"}])
    with pytest.raises(DataError, match=r"test: labels \['neutral'\] do not occur in train"):
        load_dataset(text_cfg(tiny_text_data))


@pytest.mark.parametrize("bad", ["", "   ", 42, None])
def test_empty_or_non_string_text_names_file_and_line(tiny_text_data: Path, bad: object) -> None:
    write_jsonl(tiny_text_data / "validation.jsonl", [{"text": "fine", "label": "pos"}, {"text": bad, "label": "neg"}])
    with pytest.raises(ValueError, match=r"validation.jsonl:2: 'text' must be a non-empty string"):
        load_dataset(text_cfg(tiny_text_data))


def test_one_class_and_class_without_examples_are_errors(tiny_text_data: Path) -> None:
    with pytest.raises(DataError, match=r"classes with no examples: \['neutral'\]"):
        load_dataset(text_cfg(tiny_text_data, labels=["neg", "neutral", "pos"]))
    for split in ("train", "validation", "test"):
        write_jsonl(tiny_text_data / f"{split}.jsonl", [{"text": "same", "label": "pos"}])
    with pytest.raises(DataError, match="only one class"):
        load_dataset(text_cfg(tiny_text_data))


def make_imagefolder(root: Path, classes: tuple[str, ...] = ("cat", "dog")) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "validation", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def test_corrupt_image_is_named_or_skipped_when_configured(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "imgs")
    bad = root / "train" / "dog" / "1.png"
    bad.write_bytes(bad.read_bytes()[:30])
    with pytest.raises(ValueError, match=r"dog/1.png: unreadable or corrupt image"):
        load_dataset(DataConfig(modality="image", path=root, dvc_file=None))
    ds = load_dataset(DataConfig(modality="image", path=root, dvc_file=None, skip_corrupt=True))
    assert ds.skipped == 1 and len(ds.train) == 5


def test_empty_class_folder_is_an_error(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "imgs")
    (root / "validation" / "bird").mkdir()
    with pytest.raises(ValueError, match=r"validation/bird: class folder has no images"):
        load_dataset(DataConfig(modality="image", path=root, dvc_file=None))


def test_subsample_is_stratified_and_seeded(prepared_data: Path) -> None:
    cfg = text_cfg(prepared_data / "tweets", train_limit=300, test_limit=90)
    a, b = load_dataset(cfg, seed=1), load_dataset(cfg, seed=1)
    assert a.train.items == b.train.items and abs(len(a.train) - 300) <= 3
    assert set(a.train.labels) == {0, 1, 2} and abs(len(a.test) - 90) <= 3
