"""The text modality adapter: reading CSV/JSONL splits (and, with the retraining flow, the tokenizer,
the BERT-style backbone and its ONNX input spec)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"), "test": ("test",)}
TEXT_SUFFIXES = (".jsonl", ".csv")


class TextDataError(ValueError):
    """A text split that cannot be read; the message names the file and the line."""


def find_split_file(root: Path, split: str, fmt: str = "auto") -> Path:
    """`root/<split>.jsonl|csv`, accepting the usual aliases (valid, val, dev)."""
    suffixes = TEXT_SUFFIXES if fmt == "auto" else (f".{fmt}",)
    candidates = [root / f"{alias}{suffix}" for alias in SPLIT_ALIASES[split] for suffix in suffixes]
    for path in candidates:
        if path.is_file():
            return path
    raise TextDataError(f"{root}: missing split '{split}' (looked for {', '.join(p.name for p in candidates)})")


def read_text_split(
    root: Path, split: str, fmt: str, text_column: str, label_column: str
) -> tuple[list[str], list[str]]:
    """(texts, label names) of one split; empty or non-string texts are errors naming file and line."""
    path = find_split_file(root, split, fmt)
    records = _read_jsonl(path) if path.suffix == ".jsonl" else _read_csv(path)
    texts, labels = [], []
    for line, rec in records:
        if text_column not in rec or label_column not in rec:
            raise TextDataError(f"{path}:{line}: needs columns '{text_column}' and '{label_column}', has {sorted(rec)}")
        text, label = rec[text_column], rec[label_column]
        if not isinstance(text, str) or not text.strip():
            raise TextDataError(f"{path}:{line}: '{text_column}' must be a non-empty string, got {text!r}")
        if label is None or isinstance(label, (dict, list)) or str(label).strip() == "":
            raise TextDataError(f"{path}:{line}: '{label_column}' is empty or not a scalar: {label!r}")
        texts.append(text)
        labels.append(str(label).strip())
    return texts, labels


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    out = []
    with path.open(encoding="utf-8") as fh:
        for line, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise TextDataError(f"{path}:{line}: not valid JSON ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise TextDataError(f"{path}:{line}: each line must be a JSON object")
            out.append((line, rec))
    return out


def _read_csv(path: Path) -> list[tuple[int, dict]]:
    with path.open(encoding="utf-8", newline="") as fh:
        return [(i, dict(rec)) for i, rec in enumerate(csv.DictReader(fh), start=2)]
