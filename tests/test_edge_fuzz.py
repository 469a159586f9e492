"""Fuzzing `/v1/predict` of real edge servers (text and image, each its own process on loopback) with
hypothesis-generated bad requests: random JSON shapes and types, huge and odd strings, invalid base64, exotic and
hostile images, random bytes, broken multipart, wrong content types.

The promises: never a 5xx, every refusal a JSON `{"error": …}`, the servers stay up and ready, and their memory
(RSS from /proc) stays roughly steady between a warm-up round and a longer second round.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from PIL import Image

from tests.edge_fixtures import SENTENCES, b64, build_image_bundle, build_text_bundle, free_port, png_bytes

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
MAX_BODY = 1 << 20
BOUNDARY = "fuzzb0undary"
WARMUP_EXAMPLES, EXAMPLES = 400, 2400
RSS_GROWTH_MB = 40  # allowed between rounds: allocator slack, not a leak (a leak grows with every request)


# ---------------------------------------------------------------- inputs worth trying


def _encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _exotic_images() -> list[bytes]:
    """Images that decode but are unusual, and some that must not be decoded at all."""
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8))
    frames = [Image.new("P", (5, 5), i) for i in range(3)]
    good = png_bytes(1)
    return [
        _encode(Image.new("L", (5000, 5000)), "PNG"),  # a decompression bomb: 25 Mpixel of zeros, a few kB
        _encode(Image.new("F", (6, 6), 1.5), "TIFF"),  # 32-bit float pixels
        _encode(Image.new("I;16", (6, 6), 300), "PNG"),
        _encode(Image.new("1", (6, 6), 1), "PNG"),
        _encode(rgb.convert("RGBA"), "PNG"),
        _encode(rgb.convert("CMYK"), "JPEG"),
        _encode(rgb.convert("P"), "GIF"),
        _encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        _encode(Image.new("L", (1, 1)), "BMP"),
        good[: len(good) // 2],  # truncated
        good[:8],  # the PNG signature alone
        b"GIF89a" + b"\xff" * 40,
        b"",
    ]


EXOTIC = _exotic_images()
ODD_STRINGS = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "\ud800",  # lone surrogates survive JSON but not UTF-8
    "x\udfffy",
    "\u202e\u200b\ufeff",
    "🤖" * 3000,
    "\n" * 5000,
    "é" * 10_001,  # just past max_text_chars
    "data:image/png;base64,",
    "data:,",
    "====",
    "a" * 4097,
]
RAW_BODIES = [
    b"",
    b"null",
    b"[]",
    b"{",
    b'{"inputs": [',
    b'{"inputs": "x"}',
    b'{"inputs": [' + b"9" * 5000 + b"]}",  # an integer too long for Python's int parser
    b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # nesting deeper than the recursion limit
    b"\xef\xbb\xbf" + json.dumps({"inputs": ["bom"]}).encode(),
    json.dumps({"inputs": ["utf16"]}).encode("utf-16"),
    b'{"inputs": ["a"], "inputs": 3}',
    b'{"inputs": [NaN, Infinity, -Infinity]}',
    b"x" * (MAX_BODY + 1),  # one byte over the limit
]
CONTENT_TYPES = [
    "application/json",
    "application/json; charset=latin-1",
    "text/plain",
    "application/octet-stream",
    "image/png",
    f"multipart/form-data; boundary={BOUNDARY}",
    "multipart/form-data",
    "multipart/form-data; boundary=",
    'multipart/form-data; boundary="unterminated',
    "MULTIPART/FORM-DATA; boundary=other",
    "",
    "ü/ü",
]

json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=40),
    st.sampled_from(ODD_STRINGS),
)
json_values = st.recursive(
    json_leaves,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
    max_leaves=12,
)
image_strings = st.one_of(
    st.sampled_from(EXOTIC).map(b64),
    st.sampled_from(EXOTIC).map(lambda data: "data:image/png;base64," + b64(data)),
    st.binary(max_size=300).map(b64),  # valid base64 of bytes that are no image
    st.text(max_size=60),  # mostly invalid base64
    st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=", max_size=60),
)
items = st.one_of(
    st.sampled_from(ODD_STRINGS),
    st.text(max_size=200),
    st.integers(0, 12_000).map(lambda n: "word " * (n // 5)),  # around the text length limit
    image_strings,
    json_values,
)
payloads = st.one_of(
    st.fixed_dictionaries({"inputs": st.lists(items, max_size=70)}),  # up to past max_items (64)
    st.fixed_dictionaries({"inputs": items}),
    st.dictionaries(st.text(max_size=8), json_values, max_size=3),
    json_values,
)


@st.composite
def multipart(draw: st.DrawFn) -> bytes:
    """A multipart body with random parts: files or fields, image bytes or junk, sometimes unterminated."""
    parts = []
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from(["file", "inputs", "", 'we"ird', "ü"]))
        filename = draw(st.one_of(st.none(), st.sampled_from(["a.png", "", "../../etc/passwd", "ü.png"])))
        data = draw(st.one_of(st.sampled_from(EXOTIC), st.binary(max_size=200)))
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        head = f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n"
        head += draw(st.sampled_from(["", "Content-Type: image/png\r\n", "Content-Transfer-Encoding: base64\r\n"]))
        parts.append(head.encode("utf-8") + b"\r\n" + data + b"\r\n")
    end = draw(st.sampled_from([f"--{BOUNDARY}--\r\n".encode(), b"", f"--{BOUNDARY}".encode()]))
    return b"".join(parts) + end


bodies = st.one_of(
    payloads.map(lambda p: json.dumps(p).encode()),
    st.sampled_from(RAW_BODIES),
    st.binary(max_size=2048),
    multipart(),
)
requests = st.tuples(
    st.sampled_from(["text", "image"]),
    st.sampled_from(CONTENT_TYPES).map(lambda c: c.encode("utf-8")),
    bodies,
)


# ---------------------------------------------------------------- the servers


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def _start(bundle: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "flows.cli", "edge", "serve", "--bundle", str(bundle), "--port", str(port)]
    command += ["--threads", "1", "--max-body-bytes", str(MAX_BODY), "--log-level", "warning"]
    with log.open("w") as out:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"edge server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"edge server not ready in 60 s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[subprocess.Popen, str, Path]]]:
    root = tmp_path_factory.mktemp("fuzz")
    bundles = {"text": build_text_bundle(root / "text"), "image": build_image_bundle(root / "image")}
    started = {}
    try:
        for kind, bundle in bundles.items():
            log = root / f"{kind}.log"
            proc, url = _start(bundle, log)
            started[kind] = (proc, url, log)
        yield started
    finally:
        for proc, _, _ in started.values():
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# ---------------------------------------------------------------- the fuzzing


def fuzz(servers: dict, clients: dict[str, httpx.Client], examples: int, seed_value: int, seen: dict) -> None:
    @seed(seed_value)
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=(Phase.generate, Phase.shrink),
        suppress_health_check=list(HealthCheck),
    )
    @given(request=requests)
    def one(request: tuple[str, bytes, bytes]) -> None:
        kind, content_type, body = request
        response = clients[kind].post("/v1/predict", content=body, headers={"Content-Type": content_type})
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        log = servers[kind][2]
        assert response.status_code < 500, f"{response.status_code} {response.text}\n{log.read_text()[-3000:]}"
        if response.status_code != 200:
            error = response.json()["error"]
            assert isinstance(error, str) and error, response.text

    one()


def test_bad_requests_never_get_a_5xx_and_memory_stays_steady(servers: dict) -> None:
    clients = {kind: httpx.Client(base_url=url, timeout=30) for kind, (_, url, _) in servers.items()}
    seen: dict[int, int] = {}
    try:
        fuzz(servers, clients, WARMUP_EXAMPLES, 1, seen)
        warm = {kind: rss_mb(proc.pid) for kind, (proc, _, _) in servers.items()}
        fuzz(servers, clients, EXAMPLES, 2, seen)
        after = {kind: rss_mb(proc.pid) for kind, (proc, _, _) in servers.items()}

        chunked = clients["text"].post("/v1/predict", content=iter([b"x" * 65536] * 20))  # no Content-Length
        assert chunked.status_code == 413 and "limit" in chunked.json()["error"]
        for kind, (proc, _, log) in servers.items():
            assert proc.poll() is None, f"{kind} server died:\n{log.read_text()[-3000:]}"
            assert clients[kind].get("/readyz").status_code == 200
        text = clients["text"].post("/v1/predict", json={"inputs": SENTENCES})
        assert text.status_code == 200 and len(text.json()["predictions"]) == len(SENTENCES)
        image = clients["image"].post("/v1/predict", json={"inputs": [b64(png_bytes(3))]})
        assert image.status_code == 200
    finally:
        for client in clients.values():
            client.close()
    print(f"statuses: {dict(sorted(seen.items()))}; RSS MB after warm-up {warm}, after fuzzing {after}")
    assert sum(seen.values()) >= WARMUP_EXAMPLES + EXAMPLES
    assert len(seen) >= 4  # a real mix: 200, 400, 413, 422 …
    for kind in servers:
        assert after[kind] - warm[kind] < RSS_GROWTH_MB, f"{kind}: RSS {warm[kind]:.0f} → {after[kind]:.0f} MB"
