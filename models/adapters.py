"""The one place that maps a modality name to its adapter.

Each modality is imported when asked for: a text run never loads torchvision, an image run never loads the tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from models.backbone import Adapter, TransferModel, load_head, read_meta


def make_adapter(modality: str, settings: dict[str, Any]) -> Adapter:
    """The adapter for `modality`, configured from plain settings (max_length, image_size, hflip, mean, std)."""
    if modality == "text":
        from models.text import TextAdapter

        return TextAdapter.from_settings(settings)
    if modality == "image":
        from models.vision import VisionAdapter

        return VisionAdapter.from_settings(settings)
    raise ValueError(f"unknown modality {modality!r}: expected 'text' or 'image'")


def read_split(
    modality: str, root: Path, split: str, fmt: str, text_column: str, label_column: str, skip_corrupt: bool
) -> tuple[list[Any], list[str], int]:
    """(items, label names, skipped files) of one split, read by the modality's own reader."""
    if modality == "text":
        from models.text import read_text_split

        items, labels = read_text_split(root, split, fmt, text_column, label_column)
        return items, labels, 0
    if modality == "image":
        from models.vision import read_image_split

        return read_image_split(root, split, fmt, skip_corrupt)
    raise ValueError(f"unknown modality {modality!r}: expected 'text' or 'image'")


def load_model_dir(model_dir: Path) -> tuple[Adapter, TransferModel, dict[str, Any]]:
    """Rebuild a saved (fine-tuned or registered) model: adapter from its metadata, encoder, head."""
    meta = read_meta(model_dir)
    adapter = make_adapter(meta["modality"], meta.get("preprocessing", {}))
    model = adapter.build(str(model_dir), len(meta["classes"]))
    load_head(model, model_dir)
    return adapter, model.eval(), meta
