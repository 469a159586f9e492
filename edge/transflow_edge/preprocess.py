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
from PIL import Image, UnidentifiedImageError
from tokenizers import Tokenizer

from transflow_edge.bundle import Bundle, BundleError

PREPROCESSING = "preprocessing.json"
# Bounds on what a bundle may declare, checked when it is installed: one request of 64 images at 512x512x3
# float32 is 200 MB, and a text model longer than 4096 tokens is not an edge model.
MAX_IMAGE_SIZE = 512
MAX_TEXT_LENGTH = 4096
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")  # what cameras and browsers send; no TIFF, PSD, EPS, …
MIN_PIXEL_CAP = 2048 * 2048


def default_max_pixels(image_size: int) -> int:
    """Decoded pixels allowed per image: 64x the model's input area, at least 4 megapixels (a phone photo
    resized by its app). A 4096x4096 image sent to a 28x28 model is refused from its header."""
    return max(MIN_PIXEL_CAP, 64 * image_size * image_size)


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


def _int(spec: dict[str, Any], key: str, default: int | None = None) -> int:
    """An integer field of the spec, or a BundleError naming it."""
    value = spec.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BundleError(f"{PREPROCESSING}: {key} must be an integer, got {value!r:.40}")
    return value


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
        if not 1 <= max_length <= MAX_TEXT_LENGTH:
            raise BundleError(f"{PREPROCESSING}: max_length {max_length} is outside 1..{MAX_TEXT_LENGTH}")
        if pad_token_id < 0 or pad_token_id >= tokenizer.get_vocab_size():
            raise BundleError(f"{PREPROCESSING}: pad_token_id {pad_token_id} is not in the tokenizer's vocabulary")
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
        inputs = spec.get("inputs", ["input_ids", "attention_mask"])
        if not isinstance(inputs, list) or not all(isinstance(n, str) for n in inputs):
            raise BundleError(f"{PREPROCESSING}: inputs must be a list of input names")
        return cls(
            tokenizer,
            _int(spec, "max_length"),
            _int(spec, "pad_token_id", 0),
            inputs,
            str(spec.get("padding", "longest")),
        )

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
        max_pixels: int = 0,
        formats: Sequence[str] = IMAGE_FORMATS,
    ) -> None:
        if isinstance(image_size, bool) or not 1 <= image_size <= MAX_IMAGE_SIZE:
            raise BundleError(f"{PREPROCESSING}: image_size {image_size} is outside 1..{MAX_IMAGE_SIZE}")
        if channels not in (1, 3) or len(mean) != channels or len(std) != channels:
            raise BundleError(f"{PREPROCESSING}: channels must be 1 or 3, with one mean and std per channel")
        values = [float(v) for v in [*mean, *std]]  # TypeError/ValueError: from_bundle names the field
        if not all(np.isfinite(values)) or min(float(v) for v in std) <= 0:
            raise BundleError(f"{PREPROCESSING}: mean and std must be finite numbers, std positive")
        if not isinstance(input_name, str):
            raise BundleError(f"{PREPROCESSING}: inputs must name one input")
        try:
            self.resample = Image.Resampling[resize.upper()]
        except KeyError:
            raise BundleError(f"{PREPROCESSING}: unknown resize {resize!r}") from None
        self.image_size = image_size
        self.mode = "L" if channels == 1 else "RGB"
        self.mean = np.asarray(mean, dtype=np.float32).reshape(channels, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(channels, 1, 1)
        self.input_names = [input_name]
        self.max_pixels = max_pixels or default_max_pixels(image_size)
        self.formats = [f.upper() for f in formats]

    @classmethod
    def from_bundle(
        cls, bundle: Bundle | Path, max_pixels: int = 0, formats: Sequence[str] = IMAGE_FORMATS
    ) -> ImagePreprocessor:
        spec = _spec(_as_bundle(bundle), cls.modality)
        inputs = spec.get("inputs", ["pixel_values"])
        if not isinstance(inputs, list) or len(inputs) != 1:
            raise BundleError(f"{PREPROCESSING}: inputs must name exactly one input")
        mean, std = spec.get("mean"), spec.get("std")
        for key, value in (("mean", mean), ("std", std)):
            if not isinstance(value, list) or not all(isinstance(v, int | float) for v in value):
                raise BundleError(f"{PREPROCESSING}: {key} must be a list of numbers, one per channel")
        return cls(
            _int(spec, "image_size"),
            str(spec.get("resize", "bilinear")),
            mean,
            std,
            _int(spec, "channels"),
            inputs[0],
            max_pixels,
            formats,
        )

    def decode(self, item: bytes | Image.Image | np.ndarray, index: int = 0) -> Image.Image:
        """Encoded bytes (PNG, JPEG, …) or a uint8 array → a fully loaded PIL image, size-checked first."""
        if isinstance(item, Image.Image):
            return item
        if isinstance(item, np.ndarray):
            return Image.fromarray(item)
        if not isinstance(item, bytes | bytearray):
            raise PreprocessError(f"inputs[{index}]: expected image bytes, got {type(item).__name__}")
        try:  # only the allowed decoders even look at the bytes; the size comes from the header
            image = Image.open(io.BytesIO(item), formats=self.formats)
            if image.width * image.height > self.max_pixels:
                raise PreprocessError(
                    f"inputs[{index}]: image of {image.width}x{image.height} pixels is too large "
                    f"(limit {self.max_pixels} pixels for this model)"
                )
            image.load()
        except PreprocessError:
            raise
        except Image.DecompressionBombError:
            raise PreprocessError(f"inputs[{index}]: image is too large (decompression bomb)") from None
        except UnidentifiedImageError:
            raise PreprocessError(
                f"inputs[{index}]: not a decodable image (accepted formats: {', '.join(self.formats)})"
            ) from None
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


def from_bundle(bundle: Bundle | Path, max_pixels: int = 0, formats: Sequence[str] = IMAGE_FORMATS) -> Preprocessor:
    """The preprocessor named by the bundle's preprocessing.json (image limits: see ImagePreprocessor)."""
    bundle = _as_bundle(bundle)
    try:
        modality = bundle.json(PREPROCESSING).get("modality")
    except (OSError, json.JSONDecodeError, AttributeError) as exc:
        raise BundleError(f"{PREPROCESSING}: cannot be read ({exc})") from None
    if modality not in PREPROCESSORS:
        raise BundleError(f"{PREPROCESSING}: unknown modality {modality!r}")
    if modality == "image":
        return ImagePreprocessor.from_bundle(bundle, max_pixels, formats)
    return TextPreprocessor.from_bundle(bundle)
