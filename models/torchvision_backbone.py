"""torchvision ViT / ResNet weights from a local file, as an encoder the shared TransferModel can use.

`torchvision:<builder>:<weights.pth>` e.g. `torchvision:vit_b_16:/models/vit_b_16-c867db91.pth` (the file
torchvision's hub would download); loaded with `torch.load(weights_only=True)`, never unpickled freely.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class TorchvisionEncoder(nn.Module):
    """Wraps a torchvision classifier minus its head; returns `.last_hidden_state` (B, tokens, D) like HF."""

    def __init__(self, arch: str, image_size: int):
        super().__init__()
        import torchvision.models as tvm

        if not hasattr(tvm, arch):
            raise ValueError(f"torchvision has no model builder {arch!r}")
        self.arch = arch
        self.net = getattr(tvm, arch)(weights=None)
        self.is_vit = hasattr(self.net, "class_token")
        hidden = self.net.hidden_dim if self.is_vit else self.net.fc.in_features
        size = self.net.image_size if self.is_vit else image_size
        layers = len(self.net.encoder.layers) if self.is_vit else 4
        self.config = SimpleNamespace(hidden_size=hidden, image_size=size, num_hidden_layers=layers)

    def forward(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        net = self.net
        if self.is_vit:
            x = net._process_input(pixel_values)
            x = torch.cat([net.class_token.expand(x.shape[0], -1, -1), x], dim=1)
            return SimpleNamespace(last_hidden_state=net.encoder(x))
        x = net.maxpool(net.relu(net.bn1(net.conv1(pixel_values))))
        x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
        return SimpleNamespace(last_hidden_state=torch.flatten(net.avgpool(x), 1).unsqueeze(1))

    def save_pretrained(self, out: Path, safe_serialization: bool = True) -> None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, str(out / "model.safetensors"))
        (out / "torchvision.json").write_text(json.dumps({"arch": self.arch, "image_size": self.config.image_size}))

    @classmethod
    def from_pretrained(cls, path: Path) -> TorchvisionEncoder:
        spec = json.loads((Path(path) / "torchvision.json").read_text())
        encoder = cls(spec["arch"], spec["image_size"])
        encoder.net.load_state_dict(load_file(str(Path(path) / "model.safetensors")))
        return encoder


def load_torchvision(source: str, image_size: int) -> Any:
    """`torchvision:<arch>:<weights.pth>` → TorchvisionEncoder with those weights (the classifier head dropped)."""
    _, arch, weights = source.split(":", 2)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ValueError(f"torchvision weights file {path} does not exist")
    encoder = TorchvisionEncoder(arch, image_size)
    state = torch.load(path, map_location="cpu", weights_only=True)
    head = ("heads.", "fc.")
    missing, unexpected = encoder.net.load_state_dict(state, strict=False)
    if [k for k in missing if not k.startswith(head)] or unexpected:
        raise ValueError(f"{path} does not fit torchvision {arch}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return encoder
