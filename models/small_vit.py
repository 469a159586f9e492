"""Hugging Face ViTs sized for small images (28×28, 32×32), optionally with a convolutional stem.

A 7×7 patch on a 28×28 image leaves 16 tokens; a 4×4 patch gives 49, what the transformer needs to see strokes.
The conv stem (Xiao et al. 2021, "Early convolutions help transformers see better") replaces the patchify
convolution with stride-2 3×3 convolutions: the locality prior that makes small data sets learnable. It is
recorded in the checkpoint's config.json (`conv_stem`), so a saved encoder rebuilds the stem before loading.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

# name: (hidden, layers, heads, mlp, patch, conv stem). vit-tiny / vit-small are the original two.
SCRATCH_VITS: dict[str, tuple[int, int, int, int, int, bool]] = {
    "vit-tiny": (128, 4, 4, 256, 7, False),
    "vit-small": (192, 6, 3, 768, 4, False),
    "vit-tiny-p4": (128, 4, 4, 256, 4, False),
    "vit-tiny-conv": (128, 4, 4, 256, 4, True),
    "vit-tiny-c7": (128, 4, 4, 256, 7, True),
    "vit-small-conv": (192, 6, 3, 384, 4, True),
    "vit-mini-conv": (64, 4, 2, 128, 4, True),
    "vit-narrow-conv": (96, 4, 3, 192, 4, True),
}


class ConvStem(nn.Module):
    """Convolutions before the tokens. A power-of-two patch: log2(patch) stride-2 3×3 conv + BN + GELU layers and
    a 1×1 projection. Any other patch (7 on 28×28: 16 tokens, 3× cheaper than 49): one stride-1 3×3 conv + BN +
    GELU, then the patchify convolution."""

    def __init__(self, channels: int, hidden: int, patch: int):
        super().__init__()
        layers: list[nn.Module] = []
        c_in, c_out = channels, max(16, hidden // 4)
        if patch >= 2 and not patch & (patch - 1):
            for _ in range(int(math.log2(patch))):
                layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out)]
                layers.append(nn.GELU())
                c_in, c_out = c_out, min(hidden, c_out * 2)
            layers.append(nn.Conv2d(c_in, hidden, 1))
        else:
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.GELU()]
            layers.append(nn.Conv2d(c_out, hidden, patch, stride=patch))
        self.convs = nn.Sequential(*layers)  # not "layers": transformers renames `layers.` keys on save

    @property
    def weight(self) -> torch.Tensor:  # ViTModel.forward reads projection.weight.dtype to cast its input
        return self.convs[0].weight

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.convs(pixel_values)


def install_conv_stem(vit: nn.Module) -> nn.Module:
    """Swap the patchify projection of a ViTModel (or of ViTForMaskedImageModeling's `.vit`) for a ConvStem."""
    config = vit.config
    patches = vit.embeddings.patch_embeddings
    patches.projection = ConvStem(config.num_channels, config.hidden_size, config.patch_size)
    return vit


def fit_patch(image_size: int, patch: int, conv_stem: bool) -> int:
    """The configured patch when it divides the image, else the largest one that does."""
    if image_size % patch == 0:
        return patch
    return next(p for p in (8, 7, 4, 2, 1) if image_size % p == 0)


def scratch_vit(name: str, image_size: int) -> Any:
    """A randomly initialised ViT (`scratch:vit-tiny-conv`): the from-scratch baseline and the pretraining start."""
    from transformers import ViTConfig, ViTModel

    if name not in SCRATCH_VITS:
        raise ValueError(f"unknown scratch ViT {name!r}; choose from {sorted(SCRATCH_VITS)}")
    hidden, layers, heads, mlp, patch, conv_stem = SCRATCH_VITS[name]
    patch = fit_patch(image_size, patch, conv_stem)
    config = ViTConfig(
        image_size=image_size,
        patch_size=patch,
        num_channels=3,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=mlp,
        encoder_stride=patch,
        conv_stem=conv_stem,
    )
    return (conv_stem_vit_class() if conv_stem else ViTModel)(config, add_pooling_layer=False)


def conv_stem_vit_class() -> type:
    """ViTModel whose constructor installs the stem, so `from_pretrained` loads the stem's weights too.

    transformers 5 keeps ViT checkpoints in the old key layout (`encoder.layer.N.attention.attention.query`) and
    renames them on load through a conversion table looked up by class name; a subclass defined here counts as
    custom code and gets no table, so its transformer blocks silently stayed random (only the stem and the
    embeddings loaded). Registering ViTModel's table under this class's name makes it load like any ViT."""
    from transformers import ViTModel

    class ConvStemViTModel(ViTModel):
        def __init__(self, config: Any, *args: Any, **kwargs: Any):
            super().__init__(config, *args, **kwargs)
            install_conv_stem(self)

    _share_vit_key_conversion(ConvStemViTModel.__name__)
    return ConvStemViTModel


def _share_vit_key_conversion(class_name: str) -> None:
    from transformers.conversion_mapping import (
        USER_REGISTERED_MAPPINGS,
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )

    if class_name not in USER_REGISTERED_MAPPINGS:
        register_checkpoint_conversion_mapping(class_name, get_checkpoint_conversion_mapping("ViTModel"))


def load_vit_dir(path: Path) -> Any:
    """A saved ViT encoder directory (any HF checkpoint dir); a conv-stem one is rebuilt with its stem."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(str(path))
    cls = conv_stem_vit_class() if getattr(config, "conv_stem", False) else AutoModel
    model, info = cls.from_pretrained(str(path), add_pooling_layer=False, output_loading_info=True)
    if info["missing_keys"]:  # transformers only warns and initialises them at random: a backbone in name only
        missing = sorted(info["missing_keys"])
        raise ValueError(f"{path}: {len(missing)} weights missing from the checkpoint, e.g. {missing[:3]}")
    return model
