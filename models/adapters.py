"""The one place that maps a modality name to its adapter."""

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


def load_model_dir(model_dir: Path) -> tuple[Adapter, TransferModel, dict[str, Any]]:
    """Rebuild a saved (fine-tuned or registered) model: adapter from its metadata, encoder, head."""
    meta = read_meta(model_dir)
    adapter = make_adapter(meta["modality"], meta.get("preprocessing", {}))
    model = adapter.build(str(model_dir), len(meta["classes"]))
    load_head(model, model_dir)
    return adapter, model.eval(), meta
