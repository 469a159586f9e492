"""A bundle as an MLflow pyfunc model, with no MLflow here: the logic MLflow's `predict` runs.

The registered version of a task model is an MLflow model whose artifact is the verified ONNX bundle and whose
code is this module (the edge server's own preprocessing and onnxruntime session). MLflow loads it through a
six-line "model from code" file (`mlflow/transflow_pyfunc.py`) that subclasses `mlflow.pyfunc.PythonModel`
with `BundlePyfunc`; keeping the logic here, free of MLflow, keeps the edge distribution installable without
it, and makes `mlflow.pyfunc.load_model(...).predict` answer exactly what `POST /v1/predict` answers.

Input: a table with one column, `text` (strings) or `image` (base64-encoded PNG/JPEG/…, as the edge server's
JSON body takes them). Output: one row per input, `label`, `score` and `scores` (class → softmax score).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from transflow_edge.batcher import length_groups
from transflow_edge.bundle import verify_bundle
from transflow_edge.model import LoadedModel, load_model
from transflow_edge.parsing import predictions
from transflow_edge.settings import Settings

BUNDLE_KEY = "bundle"  # the name of the bundle directory in the pyfunc's `artifacts`
COLUMNS = {"text": "text", "image": "image"}  # modality → the one input column
MAX_ROWS = 1024  # one predict call; the edge server's own request limit is far lower
MAX_BATCH = Settings.max_batch  # the server's default items per onnxruntime call


def load_bundle_model(bundle_dir: str | Path) -> LoadedModel:
    """Verify the bundle (hashes, no extra files) and build the edge's session, with its golden check."""
    return load_model(verify_bundle(Path(bundle_dir)))


def rows_of(model_input: Any, column: str) -> list[Any]:
    """The inputs from a pandas DataFrame (MLflow's usual form), a dict of columns, or a plain list."""
    if hasattr(model_input, "columns"):  # a DataFrame, without importing pandas
        if column not in model_input.columns:
            raise ValueError(f"expected a column {column!r}, got columns {list(model_input.columns)}")
        items = model_input[column].tolist()
    elif isinstance(model_input, dict):
        if column not in model_input:
            raise ValueError(f"expected a key {column!r}, got {sorted(model_input)}")
        items = list(model_input[column])
    elif isinstance(model_input, list | tuple):
        items = list(model_input)
    else:
        raise ValueError(f"expected a table with a {column!r} column, got {type(model_input).__name__}")
    if len(items) > MAX_ROWS:
        raise ValueError(f"{len(items)} rows in one call; the limit is {MAX_ROWS}")
    return items


class BundlePyfunc:
    """`load_context` / `predict` as `mlflow.pyfunc.PythonModel` defines them (MLflow's subclass mixes this in)."""

    model: LoadedModel

    def load_context(self, context: Any) -> None:
        self.model = load_bundle_model(context.artifacts[BUNDLE_KEY])

    # No type hints on predict's arguments: MLflow would read them as a schema and convert the input to match.
    def predict(self, context, model_input, params=None) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
        items = rows_of(model_input, COLUMNS[self.model.modality])
        if not items:
            return []
        return predictions(self.model, grouped_logits(self.model, self.model.prepare(items)))


def grouped_logits(model: LoadedModel, prepared: list[Any], max_batch: int = MAX_BATCH) -> np.ndarray:
    """Logits in the onnxruntime calls the edge server makes for one request of these items (texts grouped by
    length, `length_groups`): an int8 model quantises activations per call, so the grouping moves scores by up
    to its golden atol; grouped alike, the pyfunc answers what the server answers."""
    if model.modality == "text" and getattr(model.preprocessor, "padding", "") == "longest":
        calls = length_groups([len(ids) for ids, _ in prepared], max_batch)
    else:
        calls = [list(range(i, min(i + max_batch, len(prepared)))) for i in range(0, len(prepared), max_batch)]
    out: np.ndarray | None = None
    for call in calls:
        logits = model.logits([prepared[i] for i in call])
        if out is None:
            out = np.empty((len(prepared), *logits.shape[1:]), dtype=logits.dtype)
        out[call] = logits
    assert out is not None
    return out


def input_example(bundle_dir: str | Path, n: int = 2) -> dict[str, list[Any]]:
    """The first golden inputs as the model's input table (`{"text": [...]}` or `{"image": [...]}`)."""
    bundle = verify_bundle(Path(bundle_dir))
    modality = bundle.manifest["modality"]
    return {COLUMNS[modality]: list(bundle.json("golden.json")["inputs"][:n])}
