"""The edge server over real HTTP on loopback, with small real bundles (tests/edge_fixtures.py).

Covers every endpoint, bad input (always a 4xx with a JSON error), admin auth, uploads good and hostile,
an atomic swap under load, rollback, restart recovery in a second process, micro-batching, and the
promise that the edge side never imports torch.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer
from transflow_edge.bundle import BundleError, pack, write_manifest
from transflow_edge.preprocess import ImagePreprocessor, PreprocessError, TextPreprocessor
from transflow_edge.server import Settings, create_app, load_token, softmax

from tests.edge_fixtures import (
    SENTENCES,
    TEXT_LABELS,
    TOKEN,
    TOKENIZER,
    Entry,
    b64,
    build_image_bundle,
    build_text_bundle,
    entries,
    file_entry,
    flip_byte,
    free_port,
    png_bytes,
    running_server,
    special_entry,
    tampered,
    tar_gz,
)

pytestmark = pytest.mark.integration  # real uvicorn servers on loopback (the preprocessing tests ride along)

ROOT = Path(__file__).resolve().parents[1]
AUTH = {"Authorization": f"Bearer {TOKEN}"}


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Built once: two versions of the text model, one image model, and their archives."""
    root = tmp_path_factory.mktemp("bundles")
    out = {
        "text1": build_text_bundle(root / "text1", version="1", seed=0),
        "text2": build_text_bundle(root / "text2", version="2", seed=1),
        "image1": build_image_bundle(root / "image1", version="1", seed=0),
    }
    for name in ("text1", "text2"):
        out[f"{name}.tar.gz"] = pack(out[name], root / f"{name}.tar.gz")
    return out


def sha_of(bundle_dir: Path) -> str:
    return hashlib.sha256((bundle_dir / "manifest.json").read_bytes()).hexdigest()


def golden(bundle_dir: Path) -> dict:
    return json.loads((bundle_dir / "golden.json").read_text())


@pytest.fixture
def serve(tmp_path: Path) -> Iterator:
    """Start servers for one test; every one is stopped (and its state dir released) at the end."""
    stack: list = []

    def start(**kwargs: object) -> httpx.Client:
        kwargs.setdefault("state_dir", tmp_path / f"state{len(stack)}")
        kwargs.setdefault("intra_op_threads", 1)
        ctx = running_server(create_app(Settings(**kwargs)))  # type: ignore[arg-type]
        url = ctx.__enter__()
        stack.append(ctx)
        return httpx.Client(base_url=url, timeout=20)

    yield start
    for ctx in reversed(stack):
        ctx.__exit__(None, None, None)


@pytest.fixture(scope="module")
def text_client(bundles: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """One text server for the read-only and rejection tests: v1 must stay live through all of them."""
    settings = Settings(
        bundle=bundles["text1"],
        state_dir=tmp_path_factory.mktemp("text-state"),
        token=TOKEN,
        max_body_bytes=64 << 10,
        max_upload_bytes=4 << 20,
        max_bundle_bytes=5 << 20,
        intra_op_threads=1,
    )
    with running_server(create_app(settings)) as url, httpx.Client(base_url=url, timeout=20) as client:
        yield client


@pytest.fixture(scope="module")
def image_client(bundles: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    settings = Settings(bundle=bundles["image1"], state_dir=tmp_path_factory.mktemp("image-state"), intra_op_threads=1)
    with running_server(create_app(settings)) as url, httpx.Client(base_url=url, timeout=20) as client:
        yield client


def metric(text: str, sample: str, /, **labels: str) -> float:
    """The value of one sample in Prometheus text, labels matched exactly."""
    for line in text.splitlines():
        match = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if match and match[1] == sample and dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match[2] or "")) == labels:
            return float(match[3])
    raise KeyError(f"{sample}{labels} not in metrics")


def assert_json_error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert isinstance(error, str) and error
    return error


# ---------------------------------------------------------------- the edge stays light


def test_edge_imports_no_torch_and_no_pickle() -> None:
    """The edge extra must run where torch is not installed; bundles are never unpickled."""
    code = (
        "import sys, transflow_edge, transflow_edge.bundle, transflow_edge.preprocess, transflow_edge.server\n"
        "import transflow_edge.cli, flows.cli_edge\n"
        "heavy = {'torch', 'transformers', 'mlflow', 'prefect', 'torchvision', 'peft'}\n"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
    for path in [*(ROOT / "edge").rglob("*.py"), ROOT / "flows" / "cli_edge.py"]:
        assert not re.search(r"\bpickle\b|allow_pickle|joblib", path.read_text()), path


# ---------------------------------------------------------------- preprocessing


def test_text_preprocessing_truncates_and_pads_to_the_longest(bundles: dict[str, Path]) -> None:
    pre = TextPreprocessor.from_bundle(bundles["text1"])  # tokenizer.json itself pads to 128: ignored
    long = "word " * 100
    batch = pre(["hello world", long])
    reference = Tokenizer.from_file(str(TOKENIZER))
    reference.no_padding()
    ids = reference.encode("hello world").ids
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].shape == (2, 16) and batch["input_ids"].dtype == np.int64
    assert batch["input_ids"][0, : len(ids)].tolist() == ids and not batch["input_ids"][0, len(ids) :].any()
    assert batch["attention_mask"].sum(1).tolist() == [len(ids), 16]
    assert batch["input_ids"][1, -1] == reference.token_to_id("[SEP]")
    assert pre(["hi"])["input_ids"].shape == (1, 3)  # [CLS] hi [SEP]: padding is per batch
    with pytest.raises(PreprocessError, match=r"inputs\[1\]"):
        pre(["ok", 3])  # type: ignore[list-item]


def test_image_preprocessing_is_exact(bundles: dict[str, Path]) -> None:
    pre = ImagePreprocessor.from_bundle(bundles["image1"])  # size 8, mean 0.5, std 0.25, 1 channel
    buf = io.BytesIO()
    Image.new("RGB", (20, 30), (128, 128, 128)).save(buf, format="PNG")
    out = pre([buf.getvalue(), np.full((5, 5), 255, dtype=np.uint8)])["pixel_values"]
    assert out.shape == (2, 1, 8, 8) and out.dtype == np.float32
    f32 = np.float32  # ToTensor + Normalize in float32, as torchvision computes them
    np.testing.assert_array_equal(out[0], (f32(128) / f32(255) - f32(0.5)) / f32(0.25))
    np.testing.assert_array_equal(out[1], np.full((1, 8, 8), 2.0, dtype=np.float32))
    rgb = ImagePreprocessor(4, "nearest", [0.0, 0.5, 1.0], [1.0, 0.5, 0.25], channels=3)
    pixels = rgb([Image.new("RGB", (4, 4), (255, 0, 51))])["pixel_values"][0]
    np.testing.assert_allclose(pixels[:, 0, 0], [1.0, -1.0, (0.2 - 1.0) / 0.25], rtol=1e-6)
    with pytest.raises(PreprocessError, match="not a decodable image"):
        pre([b"\x89PNG but not really"])


# ---------------------------------------------------------------- the read-only endpoints


def test_text_endpoints(text_client: httpx.Client, bundles: dict[str, Path]) -> None:
    assert text_client.get("/healthz").json() == {"status": "ok"}
    assert text_client.get("/readyz").json()["ready"] is True
    info = text_client.get("/v1/model").json()
    assert info["name"] == "tweets-sentiment" and info["version"] == "1" and info["modality"] == "text"
    assert info["bundle_sha256"] == sha_of(bundles["text1"]) and info["default_model"] == "model.onnx"
    assert info["data_version"] == "md5-text-1" and info["lineage"]["backbone"] == "tiny-text"
    assert info["metrics"] == {"test_accuracy": 0.5} and info["loaded_at"]

    expected = golden(bundles["text1"])
    response = text_client.post("/v1/predict", json={"inputs": SENTENCES})
    body = response.json()
    assert response.status_code == 200 and body["model"] == {"name": "tweets-sentiment", "version": "1"}
    assert [p["label"] for p in body["predictions"]] == [TEXT_LABELS[i] for i in expected["labels"]]
    for pred, logits in zip(body["predictions"], expected["logits"], strict=True):
        np.testing.assert_allclose(list(pred["scores"].values()), softmax(np.array(logits)), atol=1e-5)
        assert pred["score"] == max(pred["scores"].values())
    assert body["latency_ms"] > 0
    long = text_client.post("/v1/predict", json={"inputs": ["so long " * 1000]})  # truncated to 16 tokens
    assert long.status_code == 200


def test_metrics_are_prometheus_text(text_client: httpx.Client) -> None:
    text_client.post("/v1/predict", json={"inputs": ["hello"]})
    text_client.post("/v1/predict", json={"inputs": []})
    response = text_client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert metric(text, "transflow_edge_requests_total", endpoint="/v1/predict", method="POST", status="200") >= 1
    assert metric(text, "transflow_edge_requests_total", endpoint="/v1/predict", method="POST", status="422") >= 1
    assert metric(text, "transflow_edge_request_duration_seconds_count", endpoint="/v1/predict") >= 2
    assert metric(text, "transflow_edge_model_ready") == 1
    assert (
        metric(
            text,
            "transflow_edge_model_info",
            name="tweets-sentiment",
            version="1",
            modality="text",
            bundle_sha256=text_client.get("/v1/model").json()["bundle_sha256"],
        )
        == 1
    )
    from prometheus_client import parser  # installed with the dev tools; validates the exposition format

    families = {f.name for f in parser.text_string_to_metric_families(text)}
    assert {"transflow_edge_requests", "transflow_edge_batch_size", "transflow_edge_model_info"} <= families


# ---------------------------------------------------------------- bad input: always a 4xx with a JSON error


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (b"", 400, "empty body"),
        (b"{", 400, "not valid JSON"),
        (b"\xff\xfe\x00", 400, "not valid JSON"),
        (b"[1, 2]", 422, "JSON object"),
        (b'{"text": "hi"}', 422, "JSON object"),
        (b'{"inputs": "hi"}', 422, "must be a list"),
        (b'{"inputs": []}', 422, "empty"),
        (json.dumps({"inputs": ["a"] * 65}).encode(), 413, "limit of 64"),
        (b'{"inputs": ["ok", 1]}', 422, "inputs[1]: expected a string"),
        (b'{"inputs": [null]}', 422, "inputs[0]"),
        (b'{"inputs": [{"text": "hi"}]}', 422, "inputs[0]"),
        (json.dumps({"inputs": ["x" * 10_001]}).encode(), 413, "10001 characters"),
        (json.dumps({"inputs": ["x" * 9_000] * 10}).encode(), 413, "limit of 65536"),
    ],
    ids=[
        "empty",
        "truncated-json",
        "not-utf8",
        "array",
        "no-inputs",
        "inputs-str",
        "inputs-empty",
        "too-many",
        "int-item",
        "null-item",
        "object-item",
        "text-too-long",
        "body-too-large",
    ],
)
def test_bad_text_input(text_client: httpx.Client, body: bytes, status: int, fragment: str) -> None:
    response = text_client.post("/v1/predict", content=body, headers={"content-type": "application/json"})
    assert fragment in assert_json_error(response, status)


def test_more_bad_requests(text_client: httpx.Client) -> None:
    chunks = (b'{"inputs": ["' + b"y" * 8192 for _ in range(10))  # chunked, no Content-Length
    assert "limit" in assert_json_error(text_client.post("/v1/predict", content=chunks), 413)
    deep = b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}"  # refused at its first item, never built
    refused = assert_json_error(text_client.post("/v1/predict", content=deep), 422)
    assert "inputs[0]: expected a string, got list" in refused
    surrogate = text_client.post("/v1/predict", content=b'{"inputs": ["a\\ud800b"]}')  # ijson: a lone one is "?"
    assert surrogate.status_code == 200
    files = [("file", ("a.png", png_bytes(1), "image/png"))]
    assert "takes text" in assert_json_error(text_client.post("/v1/predict", files=files), 422)
    assert_json_error(text_client.get("/v1/predict"), 405)
    assert_json_error(text_client.get("/nowhere"), 404)
    assert text_client.get("/readyz").json()["version"] == "1"


def test_image_predict(image_client: httpx.Client, bundles: dict[str, Path]) -> None:
    expected = golden(bundles["image1"])
    as_json = image_client.post("/v1/predict", json={"inputs": expected["inputs"]}).json()
    assert [p["label"] for p in as_json["predictions"]] == expected["labels"]
    for pred, logits in zip(as_json["predictions"], expected["logits"], strict=True):
        np.testing.assert_allclose(list(pred["scores"].values()), softmax(np.array(logits)), atol=1e-5)
    import base64

    pngs = [base64.b64decode(x) for x in expected["inputs"]]
    files = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(pngs)]
    as_files = image_client.post("/v1/predict", files=files).json()
    assert as_files["predictions"] == as_json["predictions"]
    data_url = image_client.post("/v1/predict", json={"inputs": ["data:image/png;base64," + expected["inputs"][0]]})
    assert data_url.json()["predictions"][0] == as_json["predictions"][0]
    jpeg = io.BytesIO()
    Image.new("RGB", (40, 20), (10, 200, 30)).save(jpeg, format="JPEG")
    assert image_client.post("/v1/predict", json={"inputs": [b64(jpeg.getvalue())]}).status_code == 200
    assert image_client.get("/v1/model").json()["modality"] == "image"


def test_bad_image_input(image_client: httpx.Client) -> None:
    huge = io.BytesIO()
    Image.new("1", (4200, 4200)).save(huge, format="PNG")  # small file, 17.6 megapixels: refused before decoding
    cases = [
        ({"json": {"inputs": ["this is a sentence, not an image"]}}, 422, "not base64"),
        ({"json": {"inputs": [b64(b"GIF89a but truncated")]}}, 422, "not a decodable image"),
        ({"json": {"inputs": [b64(png_bytes(0)), 7]}}, 422, "inputs[1]"),
        ({"json": {"inputs": [b64(huge.getvalue())]}}, 422, "too large"),
        ({"files": [("file", ("x.png", b"not a png", "image/png"))]}, 422, "not a decodable image"),
        (
            {
                "content": b'--zz\r\nContent-Disposition: form-data; name="field"\r\n\r\nvalue\r\n--zz--\r\n',
                "headers": {"content-type": "multipart/form-data; boundary=zz"},
            },
            422,
            "no image files",
        ),
        ({"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data; boundary=zz"}}, 400, "multipart"),
    ]
    for kwargs, status, fragment in cases:
        response = image_client.post("/v1/predict", **kwargs)  # type: ignore[arg-type]
        assert fragment in assert_json_error(response, status), kwargs
    assert image_client.get("/readyz").status_code == 200


# ---------------------------------------------------------------- admin: auth, upload, rollback


def test_admin_disabled_without_token(serve, bundles: dict[str, Path]) -> None:
    client = serve(bundle=bundles["text1"])
    archive = bundles["text2.tar.gz"].read_bytes()
    for path, body in (("/v1/admin/bundles", archive), ("/v1/admin/rollback", b"")):
        assert "disabled" in assert_json_error(client.post(path, content=body, headers=AUTH), 403)
    assert client.get("/v1/model").json()["version"] == "1"
    with pytest.raises(ValueError, match="at least 16"):
        Settings(token="short")
    assert load_token(None, {"TRANSFLOW_EDGE_TOKEN": f" {TOKEN}\n"}) == TOKEN
    assert load_token(None, {}) is None


def test_admin_auth(text_client: httpx.Client, bundles: dict[str, Path]) -> None:
    archive = bundles["text2.tar.gz"].read_bytes()
    for headers in (
        {},
        {"Authorization": "Bearer wrong-token-0123456789"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
    ):
        for path in ("/v1/admin/bundles", "/v1/admin/rollback"):
            response = text_client.post(path, content=archive, headers=headers)
            assert_json_error(response, 401)
            assert response.headers["www-authenticate"] == "Bearer"
    assert text_client.get("/v1/model").json()["version"] == "1"


def test_upload_swaps_and_rollback_toggles(serve, bundles: dict[str, Path], tmp_path: Path) -> None:
    client = serve(bundle=bundles["text1"], token=TOKEN, state_dir=tmp_path / "state")
    sha1, sha2 = sha_of(bundles["text1"]), sha_of(bundles["text2"])
    assert "no previous" in assert_json_error(client.post("/v1/admin/rollback", headers=AUTH), 409)

    loaded = client.post("/v1/admin/bundles", content=bundles["text2.tar.gz"].read_bytes(), headers=AUTH).json()
    assert loaded["status"] == "loaded" and loaded["version"] == "2" and loaded["bundle_sha256"] == sha2
    assert loaded["previous_bundle_sha256"] == sha1 and loaded["golden"]["checked"] == len(SENTENCES)
    assert client.post("/v1/predict", json={"inputs": ["hi"]}).json()["model"]["version"] == "2"
    assert client.get("/v1/model").json()["previous_bundle_sha256"] == sha1
    assert json.loads((tmp_path / "state" / "state.json").read_text()) == {"current": sha2, "previous": sha1}
    assert sorted(p.name for p in (tmp_path / "state" / "bundles").iterdir()) == sorted([sha1, sha2])

    again = client.post(
        "/v1/admin/bundles", files={"bundle": ("b.tar.gz", bundles["text2.tar.gz"].read_bytes())}, headers=AUTH
    )  # multipart works too; same bundle: nothing changes
    assert again.json()["status"] == "unchanged"

    back = client.post("/v1/admin/rollback", headers=AUTH).json()
    assert back["status"] == "rolled_back" and back["version"] == "1" and back["previous_bundle_sha256"] == sha2
    assert client.get("/v1/model").json()["version"] == "1"
    forward = client.post("/v1/admin/rollback", headers=AUTH).json()
    assert forward["version"] == "2"
    metrics = client.get("/metrics").text
    assert metric(metrics, "transflow_edge_bundle_loads_total", source="upload", result="loaded") == 1
    assert metric(metrics, "transflow_edge_bundle_loads_total", source="rollback", result="loaded") == 2


def _rebuilt(src: Path, dst: Path, edit: dict[str, bytes], version: str) -> Path:
    """A bundle with some files replaced and a fresh, valid manifest: only deeper checks can catch it."""
    shutil.copytree(src, dst)
    for name, data in edit.items():
        (dst / name).write_bytes(data)
    meta = json.loads((dst / "manifest.json").read_text())
    for key in ("format", "format_version", "files"):
        meta.pop(key)
    write_manifest(dst, {**meta, "version": version})
    return dst


@pytest.fixture(scope="module")
def hostile(bundles: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Archives that must all be refused, each with the fragment the error must contain."""
    root = tmp_path_factory.mktemp("hostile")
    good: list[Entry] = entries(bundles["text2"])
    archive = bundles["text2.tar.gz"].read_bytes()
    gold = golden(bundles["text2"])
    gold["logits"][0][0] += 0.5
    wrong_golden = _rebuilt(bundles["text2"], root / "golden", {"golden.json": json.dumps(gold).encode()}, "3")
    relabelled = golden(bundles["text2"])
    relabelled["labels"] = [(label + 1) % 3 for label in relabelled["labels"]]
    wrong_label = _rebuilt(bundles["text2"], root / "label", {"golden.json": json.dumps(relabelled).encode()}, "6")
    bad_onnx = _rebuilt(bundles["text2"], root / "onnx", {"model.onnx": b"\x08\x07 not a model"}, "4")
    two_labels = _rebuilt(bundles["text2"], root / "labels", {"labels.json": b'["a", "b"]'}, "5")
    bad_json = _rebuilt(bundles["text2"], root / "json", {"labels.json": b"[not json"}, "7")
    bad_spec = _rebuilt(bundles["text2"], root / "spec", {"preprocessing.json": b'{"modality": "image"}'}, "8")
    bomb = [*good, file_entry("padding.bin", b"\0" * (6 << 20))]
    return {
        "truncated|not a readable tar.gz": archive[: len(archive) // 2],
        "not-gzip|not a readable tar.gz": b"PK\x03\x04 a zip file perhaps",
        "tampered|model.onnx: sha256 does not match": tar_gz(tampered(good, "model.onnx", flip_byte)),
        "tampered-labels|labels.json: sha256": tar_gz(tampered(good, "labels.json", lambda b: b.replace(b"g", b"G"))),
        "extra-file|notes.txt: extra file": tar_gz([*good, file_entry("notes.txt", b"hi")]),
        "missing-file|labels.json: missing": tar_gz([e for e in good if e[0].name != "labels.json"]),
        "no-manifest|manifest.json: missing": tar_gz([e for e in good if e[0].name != "manifest.json"]),
        "dotdot|../x: path escapes": tar_gz([*good, file_entry("../x", b"evil")]),
        "absolute|/tmp/edge-evil: path escapes": tar_gz([*good, file_entry("/tmp/edge-evil", b"evil")]),
        "symlink|link: only regular files": tar_gz([*good, special_entry("link", tarfile.SYMTYPE, "/etc/passwd")]),
        "symlink-over-file|labels.json: only regular": tar_gz(
            [e for e in good if e[0].name != "labels.json"] + [special_entry("labels.json", tarfile.SYMTYPE, "x")]
        ),
        "hardlink|hard: only regular files": tar_gz([*good, special_entry("hard", tarfile.LNKTYPE, "model.onnx")]),
        "chardev|null: only regular files": tar_gz([*good, special_entry("null", tarfile.CHRTYPE)]),
        "fifo|pipe: only regular files": tar_gz([*good, special_entry("pipe", tarfile.FIFOTYPE)]),
        "too-many-files|more than 64": tar_gz([*good, *(file_entry(f"f{i}", b"") for i in range(64))]),
        "zip-bomb|unpacks to more than": tar_gz(bomb),
        "golden-mismatch|golden.json: model logits differ": pack(wrong_golden, root / "g.tar.gz").read_bytes(),
        "golden-label|golden.json: input 0 is predicted as": pack(wrong_label, root / "w.tar.gz").read_bytes(),
        "labels-not-json|labels.json: cannot be read": pack(bad_json, root / "j.tar.gz").read_bytes(),
        "wrong-spec|preprocessing.json: mean must be a list": pack(bad_spec, root / "s.tar.gz").read_bytes(),
        "bad-onnx|model.onnx: onnxruntime cannot load": pack(bad_onnx, root / "o.tar.gz").read_bytes(),
        "wrong-labels|labels.json: 2 labels": pack(two_labels, root / "l.tar.gz").read_bytes(),
    }


def test_hostile_archives_are_refused_and_v1_keeps_serving(
    text_client: httpx.Client, hostile: dict[str, bytes], bundles: dict[str, Path]
) -> None:
    state = text_client.get("/v1/model").json()
    assert state["version"] == "1"
    for case, archive in hostile.items():
        name, fragment = case.split("|")
        response = text_client.post("/v1/admin/bundles", content=archive, headers=AUTH)
        error = assert_json_error(response, 422)
        assert fragment in error and "still serving" in error, (name, error)
        prediction = text_client.post("/v1/predict", json={"inputs": ["still here?"]})
        assert prediction.status_code == 200 and prediction.json()["model"]["version"] == "1", name
    assert not Path("/tmp/edge-evil").exists()
    assert "limit" in assert_json_error(
        text_client.post("/v1/admin/bundles", content=b"\0" * (5 << 20), headers=AUTH), 413
    )
    assert "empty body" in assert_json_error(text_client.post("/v1/admin/bundles", headers=AUTH), 400)
    after = text_client.get("/v1/model").json()
    assert after["bundle_sha256"] == state["bundle_sha256"] and after["loaded_at"] == state["loaded_at"]
    metrics = text_client.get("/metrics").text
    assert metric(metrics, "transflow_edge_bundle_loads_total", source="upload", result="rejected") == len(hostile)


# ---------------------------------------------------------------- swap under load, batching


def test_atomic_swap_under_concurrent_load(serve, bundles: dict[str, Path]) -> None:
    """Predicts keep flowing through two swaps and a rollback: none fails, each is answered whole by one model."""
    client = serve(bundle=bundles["text1"], token=TOKEN, max_wait_ms=5)
    expected = {v: softmax(np.array(golden(bundles[f"text{v}"])["logits"])) for v in ("1", "2")}
    stop, failures, seen = threading.Event(), [], []

    def hammer(worker: int) -> None:
        with httpx.Client(base_url=str(client.base_url), timeout=20) as own:
            done = 0
            while not stop.is_set() or done < 8:
                k = (worker + done) % len(SENTENCES)
                done += 1
                response = own.post("/v1/predict", json={"inputs": [SENTENCES[k]]})
                if response.status_code != 200:
                    failures.append(response.text)
                    continue
                body = response.json()
                version = body["model"]["version"]
                scores = list(body["predictions"][0]["scores"].values())
                if not np.allclose(scores, expected[version][k], atol=1e-4):
                    failures.append(f"version {version} answered with another model's scores")
                seen.append(version)

    threads = [threading.Thread(target=hammer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    steps = [
        ("/v1/admin/bundles", bundles["text2.tar.gz"].read_bytes(), "2"),
        ("/v1/admin/rollback", b"", "1"),
        ("/v1/admin/rollback", b"", "2"),
    ]
    for path, body, version in steps:
        response = client.post(path, content=body, headers=AUTH)
        assert response.status_code == 200 and response.json()["version"] == version, response.text
        time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert failures == []
    assert {"1", "2"} <= set(seen) and len(seen) >= 32
    assert client.post("/v1/predict", json={"inputs": ["after"]}).json()["model"]["version"] == "2"


def _concurrent_predicts(client: httpx.Client, n: int) -> list[int]:
    barrier, statuses = threading.Barrier(n), []

    def one(i: int) -> None:
        with httpx.Client(base_url=str(client.base_url), timeout=20) as own:
            own.get("/healthz")  # connect first so the barrier releases requests, not handshakes
            barrier.wait()
            statuses.append(own.post("/v1/predict", json={"inputs": [SENTENCES[i % 4], "and one more"]}).status_code)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return statuses


def test_micro_batching_merges_concurrent_requests(serve, bundles: dict[str, Path]) -> None:
    batched = serve(bundle=bundles["text1"], max_batch=32, max_wait_ms=50)
    assert _concurrent_predicts(batched, 12) == [200] * 12
    text = batched.get("/metrics").text
    calls = metric(text, "transflow_edge_batch_requests_count")
    assert calls < 12 and calls - metric(text, "transflow_edge_batch_requests_bucket", le="1.0") >= 1
    assert metric(text, "transflow_edge_batch_size_sum") == 24

    unbatched = serve(bundle=bundles["text1"], max_batch=1, max_wait_ms=50)
    assert _concurrent_predicts(unbatched, 6) == [200] * 6
    text = unbatched.get("/metrics").text
    assert metric(text, "transflow_edge_batch_size_count") == 12
    assert metric(text, "transflow_edge_batch_size_bucket", le="1.0") == 12


def test_a_lone_request_never_waits_and_texts_are_grouped_by_length(serve, tmp_path: Path) -> None:
    bundle = build_text_bundle(tmp_path / "long", max_length=128)
    client = serve(bundle=bundle, max_batch=32, max_wait_ms=2000)
    assert client.post("/v1/predict", json={"inputs": ["warm up"]}).status_code == 200
    started = time.perf_counter()
    assert client.post("/v1/predict", json={"inputs": ["alone"]}).status_code == 200
    assert time.perf_counter() - started < 1.0  # a lone request waiting for company would take 2 s

    texts = ["short", "word " * 200, "tiny", "word " * 150, "ok"]  # 3-4 tokens and 128 (truncated) tokens
    before = metric(client.get("/metrics").text, "transflow_edge_batch_size_count")
    together = client.post("/v1/predict", json={"inputs": texts}).json()["predictions"]
    calls = metric(client.get("/metrics").text, "transflow_edge_batch_size_count") - before
    assert calls == 2  # the short ones and the long ones, each padded to their own longest
    alone = [client.post("/v1/predict", json={"inputs": [t]}).json()["predictions"][0] for t in texts]
    for a, b in zip(together, alone, strict=True):  # back in request order, same scores
        assert a["label"] == b["label"]
        np.testing.assert_allclose(list(a["scores"].values()), list(b["scores"].values()), atol=1e-5)


# ---------------------------------------------------------------- state dir: restart, corruption, locking


def _wait_ready(client: httpx.Client, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"edge server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    pytest.fail(f"edge server not ready in 60 s:\n{log.read_text()}")


def test_restart_recovers_from_state_dir_in_a_new_process(bundles: dict[str, Path], tmp_path: Path) -> None:
    """Upload v2 to one server, stop it, start `transflow edge serve --state-dir` on the same dir: v2 again."""
    state, sha1 = tmp_path / "state", sha_of(bundles["text1"])
    settings = Settings(bundle=bundles["text1.tar.gz"], token=TOKEN, state_dir=state, intra_op_threads=1)
    with running_server(create_app(settings)) as url, httpx.Client(base_url=url, timeout=20) as first:
        uploaded = first.post("/v1/admin/bundles", content=bundles["text2.tar.gz"].read_bytes(), headers=AUTH)
        assert uploaded.json()["version"] == "2"
    token_file, log = tmp_path / "token", tmp_path / "server.log"
    token_file.write_text(TOKEN + "\n")
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "flows.cli",
        "edge",
        "serve",
        "--state-dir",
        str(state),
        "--port",
        str(port),
        "--token-file",
        str(token_file),
        "--threads",
        "1",
        "--log-level",
        "warning",
    ]
    with log.open("w") as out:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=20) as client:
            _wait_ready(client, proc, log)
            info = client.get("/v1/model").json()
            assert info["version"] == "2" and info["previous_bundle_sha256"] == sha1
            assert client.post("/v1/predict", json={"inputs": ["back again"]}).json()["model"]["version"] == "2"
            assert client.post("/v1/admin/rollback", headers=AUTH).json()["version"] == "1"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert proc.returncode in (0, -signal.SIGTERM), log.read_text()  # uvicorn re-raises SIGTERM after shutdown
    assert json.loads((state / "state.json").read_text())["current"] == sha1


def test_corrupted_state_is_not_served_and_state_dir_is_locked(serve, bundles: dict[str, Path], tmp_path: Path) -> None:
    state, sha1 = tmp_path / "state", sha_of(bundles["text1"])
    app = create_app(Settings(bundle=bundles["text1"], state_dir=state, intra_op_threads=1))
    with pytest.raises(RuntimeError, match="in use"):
        create_app(Settings(state_dir=state))
    assert (state / "staging").is_dir()
    app.state.edge.close()

    model = state / "bundles" / sha1 / "model.onnx"
    model.write_bytes(flip_byte(model.read_bytes()))  # bit rot on the edge box
    client = serve(state_dir=state, token=TOKEN)
    ready = client.get("/readyz")
    assert ready.status_code == 503 and "model.onnx" in ready.json()["error"]
    assert client.get("/healthz").status_code == 200
    assert "no model loaded" in assert_json_error(client.post("/v1/predict", json={"inputs": ["x"]}), 503)
    assert_json_error(client.get("/v1/model"), 503)
    assert metric(client.get("/metrics").text, "transflow_edge_model_ready") == 0
    uploaded = client.post("/v1/admin/bundles", content=bundles["text2.tar.gz"].read_bytes(), headers=AUTH)
    assert uploaded.status_code == 200 and client.get("/readyz").json()["version"] == "2"

    with pytest.raises(BundleError, match=r"model\.onnx: sha256"):  # a bad --bundle stops the start
        create_app(Settings(bundle=state / "bundles" / sha1, state_dir=tmp_path / "other"))
    create_app(Settings(state_dir=tmp_path / "other")).state.edge.close()  # and released its state dir


def test_cli_needs_a_bundle_or_a_state_dir() -> None:
    from typer.testing import CliRunner

    from flows.cli_edge import edge_app

    result = CliRunner().invoke(edge_app, ["serve"], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "give --bundle, --state-dir, or both" in result.output
