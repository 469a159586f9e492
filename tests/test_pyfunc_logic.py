"""The pyfunc's logic (transflow_edge.mlflow_model, no MLflow) answers what the edge server answers, per modality:
the same labels and scores for the bundle's own input example, text and image (fast: tiny ONNX bundles)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import httpx
import pandas as pd
import pytest

from tests.edge_fixtures import build_image_bundle, build_text_bundle, running_server


@pytest.mark.parametrize(("build", "column"), [(build_text_bundle, "text"), (build_image_bundle, "image")])
def test_pyfunc_predict_matches_the_edge_server(tmp_path: Path, build: object, column: str) -> None:
    from transflow_edge.app import create_app
    from transflow_edge.mlflow_model import BUNDLE_KEY, BundlePyfunc, input_example
    from transflow_edge.settings import Settings

    bundle = build(tmp_path / "bundle")  # type: ignore[operator]
    example = input_example(bundle, n=4)
    assert list(example) == [column] and len(example[column]) >= 2
    model = BundlePyfunc()
    model.load_context(SimpleNamespace(artifacts={BUNDLE_KEY: str(bundle)}))
    got = model.predict(None, pd.DataFrame(example))
    with running_server(create_app(Settings(bundle=bundle, intra_op_threads=1))) as url:
        reply = httpx.post(f"{url}/v1/predict", json={"inputs": example[column]}, timeout=30)
    assert reply.status_code == 200, reply.text
    want = reply.json()["predictions"]
    assert [g["label"] for g in got] == [w["label"] for w in want]
    for g, w in zip(got, want, strict=True):
        assert g["scores"] == pytest.approx(w["scores"], abs=1e-6)
    assert model.predict(None, {column: []}) == []
    with pytest.raises(ValueError, match=f"expected a column '{column}'"):
        model.predict(None, pd.DataFrame({"other": example[column]}))
