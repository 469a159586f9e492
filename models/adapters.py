"""The one place that maps a modality name to its adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from models.backbone import Adapter, TransferModel, load_head, read_meta


def make_adapter(modality: str, max_length: int = 128, image_size: int = 224) -> Adapter:
    if modality == "text":
        from models.text import TextAdapter

        return TextAdapter(max_length=max_length)
    if modality == "image":
        from models.vision import VisionAdapter  # type: ignore[attr-defined]

        return VisionAdapter(image_size=image_size)
    raise ValueError(f"unknown modality {modality!r}: expected 'text' or 'image'")


def load_model_dir(model_dir: Path) -> tuple[Adapter, TransferModel, dict[str, Any]]:
    """Rebuild a saved (fine-tuned or registered) model: adapter from its metadata, encoder, head."""
    meta = read_meta(model_dir)
    pre = meta.get("preprocessing", {})
    adapter = make_adapter(
        meta["modality"], max_length=pre.get("max_length", 128), image_size=pre.get("image_size", 224)
    )
    model = adapter.build(str(model_dir), len(meta["classes"]))
    load_head(model, model_dir)
    return adapter, model.eval(), meta
