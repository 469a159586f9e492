"""Each image split decoded once into a uint8 tensor cache (N, 3, S, S), memory-mapped when it is large.

Decoding and resizing through PIL on every epoch cost more than the small ViTs' forward and backward passes;
with the cache, a batch is one index into a tensor. The resize is PIL bilinear, exactly what the edge server
does, so evaluation on the cache sees the pixels a deployed model sees.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Above this many bytes the cache lives in an unlinked temporary file (np.memmap) instead of RAM: the page
# cache keeps what fits, the rest stays on disk. 55,000 Fashion-MNIST images at 28×28 are 129 MB (in RAM).
MMAP_BYTES = int(os.environ.get("TRANSFLOW_IMAGE_CACHE_MMAP_BYTES", 512 << 20))


def decode_rgb(item: Any, size: int) -> np.ndarray:
    """A path or an HxW[xC] uint8 array → (size, size, 3) uint8, PIL bilinear (the edge's resize)."""
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.shape[:2] == (size, size):
        if item.ndim == 2:  # the common case for arrays (Fashion-MNIST): no PIL round trip, same pixels
            return np.repeat(item[:, :, None], 3, axis=2)
        if item.ndim == 3 and item.shape[2] == 3:
            return item
    from PIL import Image

    from models.vision import load_image

    img = load_image(item)
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.array(img, dtype=np.uint8)  # a writable copy (torch warns on read-only arrays)


class ImageCache(Sequence[torch.Tensor]):
    """Decoded images as one uint8 tensor; `take(indices)` returns a (B, 3, S, S) batch without a Python loop."""

    def __init__(self, data: torch.Tensor, mapped: bool = False):
        if data.dtype != torch.uint8 or data.ndim != 4:
            raise ValueError(f"image cache must be uint8 (N, C, H, W), got {data.dtype} {tuple(data.shape)}")
        self.data, self.mapped = data, mapped

    @classmethod
    def build(cls, items: Sequence[Any], size: int, mmap_bytes: int = MMAP_BYTES) -> ImageCache:
        shape = (len(items), 3, size, size)
        nbytes = int(np.prod(shape))
        if nbytes > mmap_bytes:
            folder = Path(tempfile.gettempdir()) / "transflow-image-cache"
            folder.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(suffix=".u8", dir=folder)
            os.close(fd)
            array = np.memmap(name, dtype=np.uint8, mode="w+", shape=shape)
            os.unlink(name)  # the mapping keeps the file alive; nothing is left behind after the process
        else:
            array = np.empty(shape, dtype=np.uint8)
        for i, item in enumerate(items):
            array[i] = decode_rgb(item, size).transpose(2, 0, 1)
        return cls(torch.from_numpy(array), mapped=isinstance(array, np.memmap))

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def __getitem__(self, i: int) -> torch.Tensor:  # type: ignore[override]
        return self.data[i]

    def take(self, indices: Sequence[int]) -> torch.Tensor:
        return self.data[torch.as_tensor(indices, dtype=torch.long)]

    @property
    def image_size(self) -> int:
        return int(self.data.shape[-1])
