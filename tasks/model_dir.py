"""Saving the fine-tuned model as a self-describing directory and registering it in MLflow."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from models.backbone import ENCODER_DIR, MODEL_META, Adapter, TransferModel, save_model

FORMAT_VERSION = 1


def write_model_dir(
    model: TransferModel, adapter: Adapter, classes: list[str], backbone: str, example: list[Any], out: Path
) -> Path:
    """encoder/ + head + preprocessing + transflow.json + signature and input example (JSON, no pickle)."""
    model.cpu().eval()
    preprocessing = adapter.save_preprocessing(out)
    meta = {
        "format_version": FORMAT_VERSION,
        "modality": adapter.modality,
        "classes": classes,
        "backbone": backbone,
        "preprocessing": preprocessing,
        "inputs": adapter.input_names,
        "outputs": ["logits"],
    }
    save_model(model, out, meta)
    signature = {
        "inputs": [{"name": name, "type": adapter.input_dtype} for name in adapter.input_names],
        "outputs": [{"name": "logits", "type": "float32", "shape": [-1, len(classes)]}],
    }
    (out / "signature.json").write_text(json.dumps(signature, indent=2) + "\n")
    (out / "input_example.json").write_text(json.dumps({"inputs": [str(x) for x in example]}, indent=2) + "\n")
    return out


def write_backbone_dir(encoder: Any, adapter: Adapter, meta: dict[str, Any], out: Path) -> Path:
    """A pretrained backbone in the layout every adapter loads: encoder/ + preprocessing + transflow.json."""
    out.mkdir(parents=True, exist_ok=True)
    encoder.cpu().save_pretrained(out / ENCODER_DIR, safe_serialization=True)
    meta = {"format_version": FORMAT_VERSION, "kind": "backbone", "modality": adapter.modality, **meta}
    meta["preprocessing"] = adapter.save_preprocessing(out)
    (out / MODEL_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out
