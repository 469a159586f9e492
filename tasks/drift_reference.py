"""The bundle's drift reference: the edge's own statistics (`transflow_edge.drift`) of the test split, as the
edge server will see it: each item in the form a client sends it (the adapter's golden input: text, or a
base64 PNG), through the bundle's own preprocessing and its shipped (default) model. Written as
`reference_stats.json` before the manifest, so the manifest pins it like every other file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from transflow_edge import drift
from transflow_edge.model import b64decode_image
from transflow_edge.preprocess import from_bundle

MAX_ITEMS = 2000  # plenty for ten bins per statistic; a seeded subset of a larger test split
BATCH = 32


def reference_values(bundle: Path, default: str, inputs: list[Any]) -> dict[str, np.ndarray]:
    """Per-item statistics of `inputs` (as clients send them) through the bundle at `bundle` (no manifest yet)."""
    preprocessor = from_bundle(bundle)
    session = ort.InferenceSession(str(bundle / default), providers=["CPUExecutionProvider"])
    feeds = [i.name for i in session.get_inputs()]
    output = session.get_outputs()[0].name
    unk = drift.unknown_token_id(preprocessor) if preprocessor.modality == "text" else None
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, len(inputs), BATCH):
        items, sizes = inputs[start : start + BATCH], []
        if preprocessor.modality == "image":  # the server's path: base64 → bytes → decoded image (its size) → array
            items = [preprocessor.decode(b64decode_image(x, i), i) for i, x in enumerate(items)]
            sizes = [image.width * image.height for image in items]
        prepared = preprocessor.prepare(items)
        features = preprocessor.collate(prepared)
        logits = session.run([output], {k: features[k] for k in feeds})[0]
        parts.append(drift.input_values(preprocessor, prepared, sizes, unk) | drift.output_values(logits))
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def write_reference_stats(
    bundle: Path,
    default: str,
    items: list[Any],
    classes: int,
    as_sent: Callable[[Any], Any] = lambda item: item,
    max_items: int = MAX_ITEMS,
    seed: int = 0,
) -> dict[str, Any]:
    """Write `reference_stats.json` into the bundle directory from the test split's `items` (each turned into
    what a client sends by `as_sent`, the adapter's golden input); returns a summary for the manifest."""
    if len(items) > max_items:
        items = [items[i] for i in np.sort(np.random.default_rng(seed).choice(len(items), max_items, replace=False))]
    inputs = [as_sent(item) for item in items]
    modality = json.loads((bundle / "preprocessing.json").read_text())["modality"]
    reference = drift.build_reference(reference_values(bundle, default, inputs), modality, classes)
    (bundle / drift.REFERENCE).write_text(json.dumps(reference, indent=1) + "\n")
    return {"file": drift.REFERENCE, "items": reference["count"], "split": "test", "model": default, "seed": seed}
