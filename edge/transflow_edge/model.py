"""The model: a verified bundle with its onnxruntime session, preprocessor, labels and golden check."""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from transflow_edge import preprocess
from transflow_edge.bundle import Bundle, BundleError
from transflow_edge.drift import DriftTracker, load_reference
from transflow_edge.preprocess import IMAGE_FORMATS, PreprocessError, Preprocessor

log = logging.getLogger("transflow.edge")


LABELS = "labels.json"
GOLDEN = "golden.json"


@dataclass(frozen=True)
class LoadedModel:
    """A verified bundle with its session and preprocessor: immutable, so a swap is one assignment."""

    bundle: Bundle
    session: ort.InferenceSession
    preprocessor: Preprocessor
    labels: list[str]
    feed_names: list[str]
    output_name: str
    loaded_at: str = ""
    golden: dict[str, Any] = field(default_factory=dict)
    drift: DriftTracker | None = None  # this version's live statistics; None: the bundle has no reference

    @property
    def name(self) -> str:
        return str(self.bundle.manifest.get("name", ""))

    @property
    def version(self) -> str:
        return str(self.bundle.manifest.get("version", ""))

    @property
    def modality(self) -> str:
        return self.preprocessor.modality

    def prepare(self, items: Sequence[Any]) -> list[Any]:
        """Per-item arrays; images arrive base64-encoded from JSON and are decoded here. Counted into this
        version's drift statistics (inputs that fail to prepare are not)."""
        sizes: list[int] = []
        if self.modality == "image":
            decode = self.preprocessor.decode  # type: ignore[union-attr]
            items = [decode(b64decode_image(item, i), i) for i, item in enumerate(items)]
            sizes = [image.width * image.height for image in items]
        prepared = self.preprocessor.prepare(items)
        if self.drift is not None:
            self.drift.observe_inputs(prepared, sizes)
        return prepared

    def logits(self, prepared: Sequence[Any]) -> np.ndarray:
        features = self.preprocessor.collate(prepared)
        return self.session.run([self.output_name], {k: features[k] for k in self.feed_names})[0]


def b64decode_image(item: Any, index: int) -> bytes:
    """Image bytes from a base64 string (a `data:image/...;base64,` prefix is allowed); bytes pass through."""
    if isinstance(item, bytes):
        return item
    if not isinstance(item, str):
        raise PreprocessError(f"inputs[{index}]: expected a base64-encoded image string, got {type(item).__name__}")
    if item.startswith("data:") and "," in item:
        item = item.split(",", 1)[1]
    try:
        return base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError):
        raise PreprocessError(f"inputs[{index}]: not base64-encoded image bytes (this model takes images)") from None


def open_session(path: Path, intra_op_threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    # Spinning threads burn an edge box's CPU between requests for a few microseconds of latency.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _read_labels(bundle: Bundle) -> list[str]:
    if LABELS not in bundle.manifest.get("files", {}):
        raise BundleError(f"{LABELS}: missing from the bundle")
    try:
        labels = bundle.json(LABELS)
    except (OSError, ValueError) as exc:
        raise BundleError(f"{LABELS}: cannot be read ({exc})") from None
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise BundleError(f"{LABELS}: must be a non-empty list of class names")
    if len(set(labels)) != len(labels):
        raise BundleError(f"{LABELS}: class names must be unique")
    return labels


def load_model(
    bundle: Bundle, intra_op_threads: int = 0, max_image_pixels: int = 0, image_formats: Sequence[str] = IMAGE_FORMATS
) -> LoadedModel:
    """Build session and preprocessor for a verified bundle and pass its golden check, or raise BundleError."""
    try:
        return _load_model(bundle, intra_op_threads, max_image_pixels, image_formats)
    except BundleError:
        raise
    except Exception as exc:  # whatever an untrusted bundle triggers, the running model keeps serving
        raise BundleError(f"bundle cannot be loaded ({type(exc).__name__}: {exc})") from None


def _load_model(
    bundle: Bundle, intra_op_threads: int, max_image_pixels: int, image_formats: Sequence[str]
) -> LoadedModel:
    default_model = bundle.manifest["default_model"]
    try:
        preprocessor = preprocess.from_bundle(bundle, max_image_pixels, image_formats)
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{preprocess.PREPROCESSING}: cannot be read ({exc})") from None
    if preprocessor.modality != bundle.manifest.get("modality"):
        raise BundleError(
            f"{preprocess.PREPROCESSING}: modality {preprocessor.modality!r} but manifest.json "
            f"says {bundle.manifest.get('modality')!r}"
        )
    labels = _read_labels(bundle)
    try:
        session = open_session(bundle.default_model, intra_op_threads)
    except Exception as exc:  # onnxruntime raises its own exception types for any unloadable model
        raise BundleError(f"{default_model}: onnxruntime cannot load it ({exc})") from None
    feed_names = [i.name for i in session.get_inputs()]
    missing = [n for n in feed_names if n not in preprocessor.input_names]
    if missing:
        raise BundleError(f"{default_model}: inputs {missing} are not produced by {preprocess.PREPROCESSING}")
    outputs = [o.name for o in session.get_outputs()]
    wanted = [o.get("name") for o in bundle.manifest.get("outputs") or [] if isinstance(o, dict)]
    output_name = next((n for n in wanted if n in outputs), outputs[0])
    model = LoadedModel(
        bundle, session, preprocessor, labels, feed_names, output_name, datetime.now(UTC).isoformat(timespec="seconds")
    )
    model = replace(model, golden=check_golden(model))  # the golden inputs are not live traffic: counted by nobody
    reference = load_reference(bundle, preprocessor.modality, len(labels))
    return model if reference is None else replace(model, drift=DriftTracker(reference, preprocessor))


def check_golden(model: LoadedModel) -> dict[str, Any]:
    """Run the bundle's own golden inputs: the logits must match within its atol, the clear winners too."""
    bundle = model.bundle
    if GOLDEN not in bundle.manifest.get("files", {}):
        raise BundleError(f"{GOLDEN}: missing from the bundle")
    try:
        golden = bundle.json(GOLDEN)
        expected = np.asarray(golden["logits"], dtype=np.float64)
        atol = float(golden.get("atol", 1e-3))
        inputs, want_labels = golden["inputs"], golden.get("labels")
        if not isinstance(inputs, list) or not inputs:
            raise ValueError("no golden inputs")
        prepared = model.prepare(inputs)
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
        raise BundleError(f"{GOLDEN}: unusable golden file ({exc})") from None
    try:
        # One extra row: a model exported with a fixed batch size must fail here, not under batched load.
        got = np.asarray(model.logits([*prepared, prepared[0]]), dtype=np.float64)[: len(prepared)]
    except Exception as exc:  # onnxruntime raises its own types for shape and type mismatches
        raise BundleError(f"{bundle.manifest['default_model']}: fails on the golden inputs ({exc})") from None
    if got.ndim != 2 or got.shape[1] != len(model.labels):
        raise BundleError(f"{LABELS}: {len(model.labels)} labels but the model outputs logits of shape {got.shape}")
    if got.shape != expected.shape:
        raise BundleError(f"{GOLDEN}: expected logits of shape {expected.shape}, the model gives {got.shape}")
    diff = float(np.max(np.abs(got - expected))) if got.size else 0.0
    if not np.isfinite(got).all() or diff > atol:
        raise BundleError(f"{GOLDEN}: model logits differ from the golden ones by {diff:.3g} (atol {atol})")
    if want_labels is not None:  # class names, or indices as the exporter writes them
        top2 = np.sort(expected, axis=1)[:, -2:] if expected.shape[1] > 1 else np.zeros((len(expected), 2))
        for i, want in enumerate(want_labels):
            top = int(np.argmax(got[i]))
            clear = top2[i, 1] - top2[i, 0] > 2 * atol  # near-ties may flip within atol
            if clear and want not in (top, model.labels[top]):
                raise BundleError(f"{GOLDEN}: input {i} is predicted as {model.labels[top]!r}, expected {want!r}")
    return {"checked": len(inputs), "max_abs_diff": diff, "atol": atol}


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)
