"""Bundle preprocessing, reproduced without torch: raw inputs → the ONNX model's input arrays.

Two classes with one interface. `prepare(items)` turns each raw input into its own arrays (this is where a
bad input fails, so the server can blame the request that sent it); `collate(prepared)` stacks prepared
items into one batch (text padded to the longest); `__call__(items)` does both. The exporter tests that
these reproduce the training-side preprocessing exactly, so they stay literal: no caching, no cleverness.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tokenizers import Tokenizer

from transflow_edge.bundle import Bundle, BundleError

PREPROCESSING = "preprocessing.json"
MAX_IMAGE_PIXELS = 4096 * 4096  # below PIL's decompression-bomb warning, far above any edge model's input


class PreprocessError(ValueError):
    """An input the model cannot take; the message says which one and why."""


def _as_bundle(bundle: Bundle | Path) -> Bundle:
    """Let the exporter point at a directory it is still writing (no manifest yet)."""
    return bundle if isinstance(bundle, Bundle) else Bundle(Path(bundle), {}, "")


def _spec(bundle: Bundle, modality: str) -> dict[str, Any]:
    try:
        spec = bundle.json(PREPROCESSING)
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{PREPROCESSING}: cannot be read ({exc})") from None
    if not isinstance(spec, dict) or spec.get("modality") != modality:
        raise BundleError(f"{PREPROCESSING}: not a {modality} preprocessing spec")
    return spec


class TextPreprocessor:
    """Tokenise with the bundle's fast tokenizer, truncate to max_length, pad the batch to its longest."""

    modality = "text"

    def __init__(
        self,
        tokenizer: Tokenizer,
        max_length: int,
        pad_token_id: int,
        input_names: Sequence[str],
        padding: str = "longest",
    ) -> None:
        if padding not in ("longest", "max_length"):
            raise BundleError(f"{PREPROCESSING}: padding {padding!r} is not 'longest' or 'max_length'")
        unknown = set(input_names) - {"input_ids", "attention_mask", "token_type_ids"}
        if unknown:
            raise BundleError(f"{PREPROCESSING}: text inputs {sorted(unknown)} are not produced by a tokenizer")
        # The file may carry its own padding/truncation; ours must not depend on them.
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_token_id = pad_token_id
        self.input_names = list(input_names)
        self.padding = padding

    @classmethod
    def from_bundle(cls, bundle: Bundle | Path) -> TextPreprocessor:
        bundle = _as_bundle(bundle)
        spec = _spec(bundle, cls.modality)
        try:
            tokenizer = Tokenizer.from_file(str(bundle.path(spec.get("tokenizer", "tokenizer.json"))))
        except Exception as exc:  # tokenizers raises a bare Exception for unreadable files
            raise BundleError(f"{spec.get('tokenizer', 'tokenizer.json')}: not a readable tokenizer ({exc})") from None
        try:
            return cls(
                tokenizer,
                int(spec["max_length"]),
                int(spec.get("pad_token_id", 0)),
                spec.get("inputs", ["input_ids", "attention_mask"]),
                spec.get("padding", "longest"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{PREPROCESSING}: invalid text spec ({exc!r})") from None

    def prepare(self, items: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Token ids and token type ids of each text, special tokens added, truncated."""
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise PreprocessError(f"inputs[{i}]: expected a string, got {type(item).__name__}")
            try:
                item.encode("utf-8")  # JSON allows lone surrogates ("\ud800"); the Rust tokenizer does not
            except UnicodeEncodeError:
                raise PreprocessError(f"inputs[{i}]: not valid Unicode (lone surrogate)") from None
        encodings = self.tokenizer.encode_batch(list(items), add_special_tokens=True)
        return [(np.asarray(e.ids, dtype=np.int64), np.asarray(e.type_ids, dtype=np.int64)) for e in encodings]

    def collate(self, prepared: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
        length = self.max_length if self.padding == "max_length" else max(len(ids) for ids, _ in prepared)
        input_ids = np.full((len(prepared), length), self.pad_token_id, dtype=np.int64)
        type_ids = np.zeros((len(prepared), length), dtype=np.int64)
        mask = np.zeros((len(prepared), length), dtype=np.int64)
        for row, (ids, types) in enumerate(prepared):
            input_ids[row, : len(ids)] = ids
            type_ids[row, : len(ids)] = types
            mask[row, : len(ids)] = 1
        arrays = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": type_ids}
        return {name: arrays[name] for name in self.input_names}

    def __call__(self, items: Sequence[str]) -> dict[str, np.ndarray]:
        return self.collate(self.prepare(items))


class ImagePreprocessor:
    """Decode, convert to L or RGB, resize, scale to [0, 1], normalise per channel; NCHW float32."""

    modality = "image"

    def __init__(
        self,
        image_size: int,
        resize: str,
        mean: Sequence[float],
        std: Sequence[float],
        channels: int,
        input_name: str = "pixel_values",
        max_pixels: int = MAX_IMAGE_PIXELS,
    ) -> None:
        if channels not in (1, 3) or len(mean) != channels or len(std) != channels:
            raise BundleError(f"{PREPROCESSING}: channels must be 1 or 3, with one mean and std per channel")
        try:
            self.resample = Image.Resampling[resize.upper()]
        except KeyError:
            raise BundleError(f"{PREPROCESSING}: unknown resize {resize!r}") from None
        self.image_size = image_size
        self.mode = "L" if channels == 1 else "RGB"
        self.mean = np.asarray(mean, dtype=np.float32).reshape(channels, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(channels, 1, 1)
        self.input_names = [input_name]
        self.max_pixels = max_pixels

    @classmethod
    def from_bundle(cls, bundle: Bundle | Path) -> ImagePreprocessor:
        spec = _spec(_as_bundle(bundle), cls.modality)
        try:
            (input_name,) = spec.get("inputs", ["pixel_values"])
            return cls(
                int(spec["image_size"]),
                spec.get("resize", "bilinear"),
                spec["mean"],
                spec["std"],
                int(spec["channels"]),
                input_name,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BundleError(f"{PREPROCESSING}: invalid image spec ({exc!r})") from None

    def decode(self, item: bytes | Image.Image | np.ndarray, index: int = 0) -> Image.Image:
        """Encoded bytes (PNG, JPEG, …) or a uint8 array → a fully loaded PIL image, size-checked first."""
        if isinstance(item, Image.Image):
            return item
        if isinstance(item, np.ndarray):
            return Image.fromarray(item)
        if not isinstance(item, bytes | bytearray):
            raise PreprocessError(f"inputs[{index}]: expected image bytes, got {type(item).__name__}")
        try:
            image = Image.open(io.BytesIO(item))
            if image.width * image.height > self.max_pixels:
                raise PreprocessError(f"inputs[{index}]: image of {image.width}x{image.height} pixels is too large")
            image.load()
        except PreprocessError:
            raise
        except Exception as exc:  # PIL raises many types for corrupt data; all mean "not an image we can read"
            raise PreprocessError(f"inputs[{index}]: not a decodable image ({type(exc).__name__}: {exc})") from None
        return image

    def to_array(self, image: Image.Image) -> np.ndarray:
        image = image.convert(self.mode).resize((self.image_size, self.image_size), self.resample)
        pixels = np.asarray(image, dtype=np.float32) / np.float32(255.0)
        chw = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        return ((chw - self.mean) / self.std).astype(np.float32)

    def prepare(self, items: Sequence[bytes | Image.Image | np.ndarray]) -> list[np.ndarray]:
        prepared = []
        for i, item in enumerate(items):
            image = self.decode(item, i)
            try:
                prepared.append(self.to_array(image))
            except (ValueError, OSError) as exc:  # exotic modes PIL cannot convert
                raise PreprocessError(f"inputs[{i}]: cannot convert the {image.mode} image ({exc})") from None
        return prepared

    def collate(self, prepared: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        return {self.input_names[0]: np.ascontiguousarray(np.stack(prepared))}

    def __call__(self, items: Sequence[bytes | Image.Image | np.ndarray]) -> dict[str, np.ndarray]:
        return self.collate(self.prepare(items))


Preprocessor = TextPreprocessor | ImagePreprocessor
PREPROCESSORS: dict[str, type[TextPreprocessor] | type[ImagePreprocessor]] = {
    "text": TextPreprocessor,
    "image": ImagePreprocessor,
}


def from_bundle(bundle: Bundle | Path) -> Preprocessor:
    """The preprocessor named by the bundle's preprocessing.json."""
    bundle = _as_bundle(bundle)
    try:
        modality = bundle.json(PREPROCESSING).get("modality")
    except (OSError, json.JSONDecodeError, AttributeError) as exc:
        raise BundleError(f"{PREPROCESSING}: cannot be read ({exc})") from None
    if modality not in PREPROCESSORS:
        raise BundleError(f"{PREPROCESSING}: unknown modality {modality!r}")
    return PREPROCESSORS[modality].from_bundle(bundle)
