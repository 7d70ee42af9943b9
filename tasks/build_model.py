"""Model families and checkpoints.

An `Arch` lists every layer's size explicitly, so compression can describe a smaller model (fewer
channels, narrower layers) as just another `Arch` and rebuild it physically.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn


@dataclass(frozen=True)
class Arch:
    family: str  # "mlp" | "cnn"
    num_classes: int
    input_shape: tuple[int, ...]  # (C, H, W)
    conv: tuple[int, ...] = ()  # output channels per conv block (cnn only)
    hidden: tuple[int, ...] = field(default=(64,))  # widths of the hidden Linear layers

    @staticmethod
    def from_search(family: str, depth: int, width: int, channels: int, num_classes: int, input_shape) -> "Arch":
        if family == "cnn":
            return Arch("cnn", num_classes, tuple(input_shape), tuple(channels * 2**i for i in range(depth)), (width,))
        return Arch("mlp", num_classes, tuple(input_shape), (), (width,) * depth)

    def scaled(self, factor: float, depth: int | None = None) -> "Arch":
        """A proportionally narrower (and optionally shallower) variant, for distillation students."""
        conv = tuple(max(1, round(c * factor)) for c in self.conv)
        hidden = tuple(max(1, round(h * factor)) for h in self.hidden)
        if depth is not None:
            if self.family == "cnn":
                conv = (conv + (conv[-1:] * depth))[:depth] if conv else conv
            else:
                hidden = (hidden + (hidden[-1:] * depth))[:depth]
        return replace(self, conv=conv, hidden=hidden)

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "Arch":
        return Arch(d["family"], d["num_classes"], tuple(d["input_shape"]), tuple(d["conv"]), tuple(d["hidden"]))


def build_model(arch: Arch) -> nn.Sequential:
    """Conv blocks (conv3x3-ReLU-maxpool while the map is >= 2 px) then an MLP head."""
    layers: list[nn.Module] = []
    c, h, w = arch.input_shape
    if arch.family == "cnn":
        for out in arch.conv:
            layers += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU()]
            if min(h, w) >= 2:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            c = out
    elif arch.family != "mlp":
        raise ValueError(f"unknown model family {arch.family!r} (expected 'mlp' or 'cnn')")
    layers.append(nn.Flatten())
    features = c * h * w
    for width in arch.hidden:
        layers += [nn.Linear(features, width), nn.ReLU()]
        features = width
    layers.append(nn.Linear(features, arch.num_classes))
    return nn.Sequential(*layers)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_checkpoint(path: Path, model: nn.Module, arch: Arch, meta: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"arch": arch.to_dict(), "state_dict": model.state_dict(), "meta": meta}, tmp)
    tmp.replace(path)
    return path


def load_checkpoint(path: Path) -> tuple[nn.Sequential, Arch, dict]:
    """Rebuild the model from a checkpoint; any unreadable or inconsistent file is one clear error."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        arch = Arch.from_dict(ckpt["arch"])
        model = build_model(arch)
        model.load_state_dict(ckpt["state_dict"])
    except FileNotFoundError:
        raise ValueError(f"checkpoint {path} does not exist") from None
    except Exception as err:  # torch raises many types for corrupt files
        raise ValueError(f"checkpoint {path} is not a readable modelforge checkpoint: {err}") from None
    return model.eval(), arch, ckpt.get("meta", {})
