"""The shape every modality shares: a pretrained encoder, a pooling step, a linear head.

`TransferModel` is what gets fine-tuned, checkpointed, exported and served. The modality adapters
(`text.py`, `vision.py`) only decide how inputs are prepared and how the encoder output is pooled.
On disk a model is a directory: `encoder/` (Hugging Face `save_pretrained`), `head.safetensors`,
the preprocessing files, and `transflow.json` (modality, classes, pooling, preprocessing settings).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import nn

MODEL_META = "transflow.json"
HEAD_FILE = "head.safetensors"
ENCODER_DIR = "encoder"


class BackboneError(ValueError):
    """A backbone that cannot be loaded: missing path, not a model, unsupported architecture."""


class TransferModel(nn.Module):
    """encoder → pool → dropout → linear head. `features()` is what the probe caches."""

    def __init__(self, encoder: nn.Module, pool: nn.Module, hidden_size: int, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        self.pool = pool
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, num_labels)

    def features(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.pool(self.encoder(**inputs).last_hidden_state, inputs)

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(**inputs)))


class HeadOnly(nn.Module):
    """The head alone, fed cached features: the probe stage trains this, sharing the head's weights."""

    def __init__(self, model: TransferModel):
        super().__init__()
        self.dropout = model.dropout
        self.head = model.head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(features))


class Adapter(Protocol):
    """What a modality provides; everything else (stages, trainer, export) is shared."""

    modality: str
    lora_targets: list[str]
    input_names: list[str]
    input_dtype: str

    def build(self, source: str, num_labels: int) -> TransferModel: ...
    def encode(self, items: list[Any]) -> list[Any]: ...
    def length(self, example: Any) -> int: ...
    def collate(self, examples: list[Any], train: bool) -> dict[str, torch.Tensor]: ...
    def save_preprocessing(self, out: Path) -> dict[str, Any]: ...
    def export_preprocessing(self, out: Path) -> dict[str, Any]: ...
    def dynamic_axes(self) -> dict[str, dict[int, str]]: ...
    def golden_input(self, item: Any) -> Any: ...
    def classical_baseline(self, train: list[Any], train_y: list[int], test: list[Any]) -> list[int]: ...


class OnnxSignature(nn.Module):
    """Positional inputs in the adapter's order, logits out: the shape ONNX export and serving expect."""

    def __init__(self, model: TransferModel, input_names: list[str]):
        super().__init__()
        self.model, self.input_names = model, input_names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.input_names, tensors, strict=True)))


_BLOCK = re.compile(r"(?:^|\.)(?:layer|layers|blocks|h)\.(?:encoder_layer_)?(\d+)\.")


def num_blocks(model: TransferModel) -> int:
    config = getattr(model.encoder, "config", None)
    n = getattr(config, "num_hidden_layers", None)
    if n is None:
        ids = {int(m.group(1)) for name, _ in model.encoder.named_parameters() if (m := _BLOCK.search(name))}
        n = max(ids) + 1 if ids else 0
    return int(n)


def layer_id(name: str, n_blocks: int) -> int:
    """0 for embeddings, i+1 for transformer block i, n_blocks+1 for everything above (norms, pooler, head)."""
    if not name.startswith("encoder."):
        return n_blocks + 1
    match = _BLOCK.search(name)
    if match:
        return int(match.group(1)) + 1
    return 0 if "embed" in name else n_blocks + 1


def save_model(model: TransferModel, out: Path, meta: dict[str, Any]) -> Path:
    """Write the model directory (safetensors only, no pickle)."""
    out.mkdir(parents=True, exist_ok=True)
    model.encoder.save_pretrained(out / ENCODER_DIR, safe_serialization=True)
    save_file({k: v.contiguous() for k, v in model.head.state_dict().items()}, str(out / HEAD_FILE))
    (out / MODEL_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out


def read_meta(model_dir: Path) -> dict[str, Any]:
    path = model_dir / MODEL_META
    if not path.is_file():
        raise BackboneError(f"{model_dir}: not a transflow model directory (no {MODEL_META})")
    return json.loads(path.read_text())


def load_head(model: TransferModel, model_dir: Path) -> None:
    state = load_file(str(model_dir / HEAD_FILE))
    if state["weight"].shape != model.head.weight.shape:
        raise BackboneError(
            f"{model_dir}: head has {state['weight'].shape[0]} classes, expected {model.head.weight.shape[0]}"
        )
    model.head.load_state_dict(state)
