"""The Open Inference Protocol (v2) routes with clients nobody here wrote: NVIDIA's `tritonclient[http]`
(liveness, readiness, metadata, infer on a text and an image bundle, JSON and binary tensor data), and
`schemathesis` fuzzing every route of the served OpenAPI schema (never a 5xx)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from transflow_edge.server import Settings, create_app

from tests.edge_fixtures import SENTENCES, TOKEN, build_image_bundle, build_text_bundle, png_bytes, running_server

pytestmark = pytest.mark.integration

httpclient = pytest.importorskip("tritonclient.http")
utils = pytest.importorskip("tritonclient.utils")


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[str, Path]]]:
    root = tmp_path_factory.mktemp("v2")
    bundles = {"text": build_text_bundle(root / "text"), "image": build_image_bundle(root / "image")}
    text_app = create_app(Settings(bundle=bundles["text"], state_dir=root / "ts", token=TOKEN, intra_op_threads=1))
    image_app = create_app(Settings(bundle=bundles["image"], state_dir=root / "is", intra_op_threads=1))
    with running_server(text_app) as text_url, running_server(image_app) as image_url:
        yield {"text": (text_url, bundles["text"]), "image": (image_url, bundles["image"])}


def golden(bundle: Path) -> dict:
    return json.loads((bundle / "golden.json").read_text())


def triton(url: str):  # type: ignore[no-untyped-def]
    return httpclient.InferenceServerClient(url=url.removeprefix("http://"), network_timeout=30.0)


def test_tritonclient_text(servers: dict) -> None:
    url, bundle = servers["text"]
    client = triton(url)
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata()["name"] == "transflow-edge"
    assert client.is_model_ready("tweets-sentiment")
    meta = client.get_model_metadata("tweets-sentiment")
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert meta["versions"] == ["1"] and meta["platform"] == "onnxruntime_onnx"
    expected = np.asarray(golden(bundle)["logits"], dtype=np.float32)
    for binary in (True, False):
        text = httpclient.InferInput("text", [len(SENTENCES)], "BYTES")
        text.set_data_from_numpy(np.array(SENTENCES, dtype=np.object_), binary_data=binary)
        outputs = [httpclient.InferRequestedOutput(n, binary_data=False) for n in ("logits", "label")]
        result = client.infer("tweets-sentiment", [text], outputs=outputs, request_id="r1")
        np.testing.assert_allclose(result.as_numpy("logits"), expected, atol=1e-4)
        labels = [x.decode() if isinstance(x, bytes) else x for x in result.as_numpy("label")]
        assert labels == [["negative", "neutral", "positive"][i] for i in expected.argmax(1)]
        assert result.get_response()["id"] == "r1"
    with pytest.raises(utils.InferenceServerException, match="unknown model"):
        client.get_model_metadata("no-such-model")
    client.close()


def test_tritonclient_image(servers: dict) -> None:
    url, bundle = servers["image"]
    client = triton(url)
    assert client.is_model_ready("fashion-items")
    import base64

    images = [base64.b64decode(x) for x in golden(bundle)["inputs"]]
    expected = np.asarray(golden(bundle)["logits"], dtype=np.float32)
    raw = httpclient.InferInput("image", [len(images)], "BYTES")
    raw.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=True)  # encoded PNG bytes
    result = client.infer("fashion-items", [raw])
    np.testing.assert_allclose(result.as_numpy("logits"), expected, atol=1e-4)
    encoded = httpclient.InferInput("image", [len(images)], "BYTES")
    encoded.set_data_from_numpy(np.array(golden(bundle)["inputs"], dtype=np.object_), binary_data=False)  # base64
    result = client.infer("fashion-items", [encoded], outputs=[httpclient.InferRequestedOutput("probabilities")])
    np.testing.assert_allclose(result.as_numpy("probabilities").sum(1), 1.0, atol=1e-5)
    bad = httpclient.InferInput("image", [1], "BYTES")
    bad.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_), binary_data=True)
    with pytest.raises(utils.InferenceServerException, match="not a decodable image"):
        client.infer("fashion-items", [bad])
    client.close()
    too_many = {"inputs": [{"name": "image", "shape": [65], "datatype": "BYTES", "data": ["x"] * 65}]}
    response = httpx.post(f"{url}/v2/models/fashion-items/infer", json=too_many)
    assert response.status_code == 413
    deep = b'{"inputs": [' + b"[" * 50_000 + b"]" * 50_000 + b"]}"
    assert httpx.post(f"{url}/v2/models/fashion-items/infer", content=deep).status_code == 413
    assert png_bytes(0)  # the fixture's images decode as the golden ones did


def test_openapi_schema_is_served_and_fuzzing_it_never_gives_a_5xx(servers: dict) -> None:
    import schemathesis
    from schemathesis.checks import not_a_server_error

    for kind in ("text", "image"):
        url, _ = servers[kind]
        document = httpx.get(f"{url}/openapi.json").json()
        assert {"/v1/predict", "/v2/models/{name}/infer", "/v2/health/ready"} <= set(document["paths"])
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        calls = 0
        for result in schema.get_all_operations():
            operation = result.ok()

            @given(case=operation.as_strategy())
            @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            def check(case) -> None:  # type: ignore[no-untyped-def]
                nonlocal calls
                calls += 1
                case.call_and_validate(checks=[not_a_server_error])

            check()
        assert calls >= 100
        assert httpx.get(f"{url}/readyz").status_code == 200
