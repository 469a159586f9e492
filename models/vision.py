"""The vision modality adapter: reading ImageFolder trees and `.npy` arrays (and, with the vision
issue, transforms, the ViT backbone and its ONNX input spec)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "valid", "val"), "test": ("test",)}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class ImageDataError(ValueError):
    """An image split that cannot be read; the message names the folder or the file."""


def detect_format(root: Path) -> str:
    return "npy" if (root / "classes.json").is_file() and any(root.glob("*-images.npy")) else "imagefolder"


def read_image_split(root: Path, split: str, fmt: str, skip_corrupt: bool) -> tuple[list, list[str], int]:
    """(items, label names, skipped): items are image paths (ImageFolder) or HxW[xC] uint8 arrays (npy)."""
    fmt = detect_format(root) if fmt == "auto" else fmt
    if fmt == "npy":
        items, labels = read_npy_split(root, split)
        return items, labels, 0
    if fmt != "imagefolder":
        raise ImageDataError(f"{root}: format '{fmt}' is not an image format (imagefolder or npy)")
    return read_imagefolder_split(root, split, skip_corrupt)


def _split_dir(root: Path, split: str) -> Path:
    for alias in SPLIT_ALIASES[split]:
        if (root / alias).is_dir():
            return root / alias
    raise ImageDataError(f"{root}: missing split folder '{split}' (looked for {', '.join(SPLIT_ALIASES[split])})")


def read_imagefolder_split(root: Path, split: str, skip_corrupt: bool) -> tuple[list, list[str], int]:
    """`root/<split>/<class>/<image>`; every image is opened and verified once, corrupt ones named."""
    from PIL import Image, UnidentifiedImageError

    folder = _split_dir(root, split)
    items, labels, skipped = [], [], 0
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ImageDataError(f"{class_dir}: class folder has no images")
        for path in files:
            try:
                with Image.open(path) as img:
                    img.verify()
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
                if not skip_corrupt:
                    raise ImageDataError(f"{path}: unreadable or corrupt image ({exc})") from None
                skipped += 1
                continue
            items.append(path)
            labels.append(class_dir.name)
    return items, labels, skipped


def read_npy_split(root: Path, split: str) -> tuple[list[np.ndarray], list[str]]:
    """`<split>-images.npy` (N,H,W[,C] uint8), `<split>-labels.npy` (indices), `classes.json` (names)."""
    images_path, labels_path = root / f"{split}-images.npy", root / f"{split}-labels.npy"
    for p in (images_path, labels_path, root / "classes.json"):
        if not p.is_file():
            raise ImageDataError(
                f"{p}: missing (npy layout needs <split>-images.npy, <split>-labels.npy, classes.json)"
            )
    classes = json.loads((root / "classes.json").read_text())
    images = np.load(images_path, allow_pickle=False)
    indices = np.load(labels_path, allow_pickle=False)
    if len(images) != len(indices):
        raise ImageDataError(f"{images_path}: {len(images)} images but {len(indices)} labels")
    if indices.size and (indices.min() < 0 or indices.max() >= len(classes)):
        raise ImageDataError(f"{labels_path}: label index outside classes.json ({len(classes)} classes)")
    return list(images), [classes[int(i)] for i in indices]
