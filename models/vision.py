"""The vision modality adapter: reading ImageFolder trees and `.npy` arrays, batch augmentation, the backbone
(scratch ViTs, saved Hugging Face ViT directories, torchvision ViT/ResNet weights) and its ONNX input spec.

PIL, scikit-learn and transformers are imported where they are used: the CLI and the edge-facing helpers import
this module without needing them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from models.augment import AugmentSpec, BatchAugment
from models.backbone import ENCODER_DIR, MODEL_META, BackboneError, TransferModel
from models.image_cache import ImageCache, decode_rgb
from models.small_vit import SCRATCH_VITS, load_vit_dir, scratch_vit
from models.torchvision_backbone import IMAGENET_MEAN, IMAGENET_STD, TorchvisionEncoder, load_torchvision

__all__ = ["SCRATCH_VITS", "ImageCache", "VisionAdapter", "load_image", "scratch_vit"]

if TYPE_CHECKING:
    from PIL import Image

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


# --- the adapter: image transforms, ViT backbone, CLS pooling ----------------------------------

DEFAULT_MEAN, DEFAULT_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


class ClsPool(torch.nn.Module):
    """The [CLS] token's final state: what ViT classifiers read."""

    def forward(self, hidden: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return hidden[:, 0]


def load_image(item: Any) -> Image.Image:
    """A path or an HxW[xC] uint8 array → an RGB PIL image (grayscale replicated, alpha dropped)."""
    from PIL import Image

    img = Image.open(item) if isinstance(item, (str, Path)) else Image.fromarray(np.asarray(item))
    return img.convert("RGB")


class VisionAdapter:
    """Each split is decoded once into a uint8 tensor cache (PIL bilinear resize, exactly what the edge does);
    a training batch is augmented as one tensor (models/augment.py), then normalised."""

    modality = "image"
    lora_targets: ClassVar[list[str]] = ["q_proj", "v_proj", "query", "value"]  # transformers 5 and 4 names
    input_names: ClassVar[list[str]] = ["pixel_values"]
    input_dtype = "float32"

    def __init__(
        self,
        image_size: int = 224,
        hflip: bool = True,
        mean: tuple = DEFAULT_MEAN,
        std: tuple = DEFAULT_STD,
        augment: str = "light",
        random_erasing: float = 0.0,
    ):
        self.image_size, self.hflip = image_size, hflip
        self.mean, self.std = tuple(mean), tuple(std)
        self.augment, self.random_erasing = augment, random_erasing
        self._augmenter: BatchAugment | None = None

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> VisionAdapter:
        keys = ("image_size", "hflip", "mean", "std", "augment", "random_erasing")
        return cls(**{k: settings[k] for k in keys if settings.get(k) is not None})

    def build(self, source: str, num_labels: int) -> TransferModel:
        try:
            encoder = self._encoder(source)
        except (OSError, ValueError, RuntimeError) as exc:
            raise BackboneError(f"cannot load vision backbone {source!r}: {exc}") from None
        size = getattr(encoder.config, "image_size", self.image_size)
        if size != self.image_size:
            self.image_size = int(size)  # the backbone's position embeddings fix the input size
        return TransferModel(encoder, ClsPool(), encoder.config.hidden_size, num_labels)

    def _encoder(self, source: str) -> Any:
        if source.startswith("scratch:resnet"):  # a random torchvision ResNet: the start of its pretraining
            return TorchvisionEncoder(source.removeprefix("scratch:"), self.image_size)
        if source.startswith("scratch:"):
            return scratch_vit(source.removeprefix("scratch:"), self.image_size)
        if source.startswith("torchvision:"):
            if self.mean == DEFAULT_MEAN and self.std == DEFAULT_STD:
                self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
            return load_torchvision(source, self.image_size)
        path = Path(source).expanduser()
        if (path / MODEL_META).is_file():
            meta = json.loads((path / MODEL_META).read_text())
            self._adopt(meta.get("preprocessing", {}))
            path = path / ENCODER_DIR
        elif not path.exists() and (source.startswith((".", "/", "~")) or source.count("/") > 1):
            raise BackboneError(f"backbone path {source} does not exist")
        if (path / "torchvision.json").is_file():
            return TorchvisionEncoder.from_pretrained(path)
        if path.is_dir() and not (path / "config.json").is_file():
            raise BackboneError(f"{path}: not a model directory (no config.json)")
        self._adopt_processor(path)
        if path.is_dir():
            return load_vit_dir(path)  # any HF ViT checkpoint dir; a conv-stem one rebuilds its stem first
        from transformers import AutoModel

        return AutoModel.from_pretrained(str(path), add_pooling_layer=False)

    def _adopt(self, pre: dict[str, Any]) -> None:
        """The backbone's normalisation is part of its weights' contract; augmentation (flips, policy) is the
        run's own choice: a backbone pretrained with flips on Fashion-MNIST must not flip the digits."""
        self.mean, self.std = tuple(pre.get("mean", self.mean)), tuple(pre.get("std", self.std))

    def _adopt_processor(self, path: Path) -> None:
        """Use the checkpoint's own normalisation when it ships a preprocessor_config.json."""
        config = path / "preprocessor_config.json"
        if config.is_file():
            spec = json.loads(config.read_text())
            self.mean = tuple(spec.get("image_mean", self.mean))
            self.std = tuple(spec.get("image_std", self.std))

    def encode(self, items: list[Any]) -> ImageCache:
        """Decode and resize every image once (the cache batches index into)."""
        return ImageCache.build(items, self.image_size)

    def augmenter(self) -> BatchAugment:
        if self._augmenter is None:
            spec = AugmentSpec(policy=self.augment, hflip=self.hflip, erasing=self.random_erasing)
            self._augmenter = BatchAugment(spec)
        return self._augmenter

    def uint8_batch(self, examples: Any) -> torch.Tensor:
        """(B, 3, S, S) uint8 from a cache batch, cached images, or raw items (paths, arrays) decoded here."""
        if isinstance(examples, torch.Tensor):
            return examples
        if all(isinstance(e, torch.Tensor) for e in examples):
            return torch.stack(list(examples))
        return torch.stack([torch.from_numpy(decode_rgb(e, self.image_size)).permute(2, 0, 1) for e in examples])

    def pixels(self, item: Any, train: bool) -> torch.Tensor:
        return self.collate([item], train)["pixel_values"][0]

    def length(self, example: Any) -> int:
        return 0  # every image becomes image_size × image_size: nothing to gain from sorting

    def collate(self, examples: Any, train: bool = False) -> dict[str, torch.Tensor]:
        batch = self.uint8_batch(examples)
        x = self.augmenter()(batch) if train else batch.float().div_(255)
        mean = torch.tensor(self.mean, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(1, 3, 1, 1)
        return {"pixel_values": (x - mean) / std}

    def settings(self) -> dict[str, Any]:
        return {
            "image_size": self.image_size,
            "hflip": self.hflip,
            "mean": list(self.mean),
            "std": list(self.std),
            "augment": self.augment,
            "random_erasing": self.random_erasing,
        }

    def save_preprocessing(self, out: Path) -> dict[str, Any]:
        return {**self.settings(), "resize": "bilinear", "channels": 3, "pooling": "cls"}

    def export_preprocessing(self, out: Path) -> dict[str, Any]:
        return {
            "modality": "image",
            "image_size": self.image_size,
            "resize": "bilinear",
            "mean": list(self.mean),
            "std": list(self.std),
            "channels": 3,
            "inputs": list(self.input_names),
        }

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {"pixel_values": {0: "batch"}}

    def golden_input(self, item: Any) -> str:
        """Base64 PNG of the original image, as a client would send it."""
        import base64
        import io

        if isinstance(item, (str, Path)):
            return base64.b64encode(Path(item).read_bytes()).decode()
        buf = io.BytesIO()
        load_image(item).save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    def classical_baseline(self, train: list[Any], train_y: list[int], test: list[Any]) -> list[int]:
        """Logistic regression on 16×16 grayscale pixels: what a model must beat to have learned anything."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        def flat(items: list[Any]) -> np.ndarray:
            return np.stack(
                [np.asarray(load_image(i).convert("L").resize((16, 16)), np.float32).ravel() for i in items]
            )

        pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        return pipe.fit(flat(train), train_y).predict(flat(test)).tolist()
