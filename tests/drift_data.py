"""Seeded traffic for the drift tests and benchmark, from real offline data: tweets (in domain for the text
model), sentences of Python's own documentation (another domain: longer, technical), sklearn's 8x8 digits as
PNGs, and the same digits inverted. Plus the tiny test bundles of `tests/edge_fixtures.py` with a drift
reference written by the exporter's own code (`tasks/drift_reference.py`) and pinned by a rewritten manifest.
"""

from __future__ import annotations

import io
import json
import pydoc
import re
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from transflow_edge.bundle import MANIFEST, write_manifest

from tasks.demo_datasets import read_tweet_rows, tweets_source
from tasks.drift_reference import write_reference_stats
from tests.edge_fixtures import IMAGE_LABELS, TEXT_LABELS, b64, build_image_bundle, build_text_bundle

DOC_MODULES = ("json", "tarfile", "argparse", "collections", "logging", "subprocess", "threading", "pathlib",
               "asyncio", "decimal", "email", "sqlite3", "unittest", "zipfile", "csv", "heapq")  # fmt: skip


@cache
def _tweets() -> tuple[str, ...]:
    return tuple(text for text, _, _ in read_tweet_rows(tweets_source()))


def tweets(n: int, seed: int) -> list[str]:
    """`n` tweets picked by `seed` (different seeds: mostly different tweets, same distribution)."""
    pool = _tweets()
    return [pool[i] for i in np.random.default_rng(seed).choice(len(pool), n, replace=False)]


@cache
def _doc_sentences() -> tuple[str, ...]:
    text = " ".join(pydoc.plain(pydoc.render_doc(name)) for name in DOC_MODULES)
    sentences = (" ".join(s.split()) for s in re.split(r"(?<=[.!?])\s+", text))
    return tuple(s for s in sentences if 40 <= len(s) <= 400)


def other_domain_texts(n: int, seed: int) -> list[str]:
    """`n` sentences of the standard library's documentation: not tweets."""
    pool = _doc_sentences()
    return [pool[i] for i in np.random.default_rng(seed).choice(len(pool), n, replace=False)]


@cache
def _digits() -> np.ndarray:
    from sklearn.datasets import load_digits

    return np.rint(load_digits().images * (255.0 / 16.0)).astype(np.uint8)


def digits(n: int, seed: int, inverted: bool = False) -> list[str]:
    """`n` of sklearn's digits as base64 PNGs (as a client sends them); `inverted`: white on black → black on
    white. Seeds 0 and 1 draw from disjoint halves (reference vs live)."""
    images = _digits()
    half = np.arange(len(images))[seed % 2 :: 2]
    out = []
    for i in np.random.default_rng(seed).choice(half, n, replace=False):
        pixels = 255 - images[i] if inverted else images[i]
        buf = io.BytesIO()
        Image.fromarray(pixels, "L").save(buf, format="PNG")
        out.append(b64(buf.getvalue()))
    return out


def add_reference(bundle: Path, items: list[Any], classes: int) -> Path:
    """Write the drift reference into a built bundle as the exporter does, then re-pin it in the manifest."""
    summary = write_reference_stats(bundle, "model.onnx", items, classes)
    manifest = json.loads((bundle / MANIFEST).read_text())
    meta = {k: v for k, v in manifest.items() if k not in ("format", "format_version", "files")}
    write_manifest(bundle, meta | {"drift_reference": summary})
    return bundle


def text_bundle(out: Path, version: str = "1", reference_items: int = 600) -> Path:
    """The tiny text model (real MiniLM tokenizer, 64 tokens) with a reference from tweets (seed 0)."""
    return add_reference(build_text_bundle(out, version, max_length=64), tweets(reference_items, 0), len(TEXT_LABELS))


def image_bundle(out: Path, version: str = "1", reference_items: int = 600) -> Path:
    """The tiny 8x8 image model with a reference from one half of the digits (seed 0)."""
    return add_reference(build_image_bundle(out, version), digits(reference_items, 0), len(IMAGE_LABELS))
