"""The edge's torch-free preprocessing reproduces the training side exactly, on the real test splits.

Text: `TextPreprocessor` (Rust tokenizers + numpy) against `TextAdapter.encode` + `collate` (transformers + torch)
on every tweet of the test split, in batches: identical token ids and attention masks, padding included.
Images: `ImagePreprocessor` (PIL + numpy) against `VisionAdapter.collate(train=False)` on the digits PNGs and on
Fashion-MNIST arrays (sent as PNG bytes, as a client would, and as arrays): pixel tensors within 1e-6.
Each side's spec comes from the adapter's own `export_preprocessing`, as in a real bundle.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transflow_edge.preprocess import ImagePreprocessor, TextPreprocessor

from models.text import TextAdapter, read_text_split
from models.vision import VisionAdapter, read_image_split

BATCH = 64
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def bundle_dir(out: Path, spec: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "preprocessing.json").write_text(json.dumps(spec))
    return out


def test_text_token_ids_and_masks_match_on_the_whole_test_split(prepared_data: Path, tmp_path: Path) -> None:
    texts, _ = read_text_split(prepared_data / "tweets", "test", "auto", "text", "label")
    adapter = TextAdapter(max_length=64)
    adapter.build("minilm", 3)
    edge = TextPreprocessor.from_bundle(bundle_dir(tmp_path, adapter.export_preprocessing(tmp_path)))
    truncated = 0
    for start in range(0, len(texts), BATCH):
        chunk = texts[start : start + BATCH]
        want = adapter.collate(adapter.encode(chunk))
        got = edge(chunk)
        for name in ("input_ids", "attention_mask"):
            expected = want[name].numpy()
            assert got[name].dtype == np.int64 and got[name].shape == expected.shape, (start, name)
            mismatch = np.flatnonzero((got[name] != expected).any(axis=1))
            assert mismatch.size == 0, f"{name} differs for {[chunk[i] for i in mismatch[:3]]!r}"
        truncated += int((want["attention_mask"].sum(1) == 64).sum())
    assert len(texts) > 3000
    assert truncated > 0  # the truncation rule was exercised, not only padding
    assert any(not t.isascii() for t in texts)  # and so were emoji, accents and mojibake


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(("size", "mean", "std"), [(28, (0.5,) * 3, (0.5,) * 3), (40, *IMAGENET)])
def test_image_pixels_match_on_digits_and_fashion_mnist(
    prepared_data: Path, tmp_path: Path, size: int, mean: tuple, std: tuple
) -> None:
    adapter = VisionAdapter(image_size=size, mean=mean, std=std)
    edge = ImagePreprocessor.from_bundle(bundle_dir(tmp_path, adapter.export_preprocessing(tmp_path)))
    paths, _, _ = read_image_split(prepared_data / "digits", "test", "auto", skip_corrupt=False)
    arrays, _, _ = read_image_split(prepared_data / "fashion-mnist", "test", "auto", skip_corrupt=False)
    arrays = arrays[:512]
    cases = {
        "digits png files": (paths, [Path(p).read_bytes() for p in paths]),
        "fashion-mnist as png bytes": (arrays, [_png(a) for a in arrays]),
        "fashion-mnist as arrays": (arrays, arrays),
    }
    for case, (train_items, edge_items) in cases.items():
        for start in range(0, len(train_items), BATCH):
            want = adapter.collate(train_items[start : start + BATCH], train=False)["pixel_values"].numpy()
            got = edge(edge_items[start : start + BATCH])["pixel_values"]
            assert got.dtype == np.float32 and got.shape == want.shape == (len(want), 3, size, size), case
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=f"{case}, batch at {start}")
    assert len(paths) == 270
