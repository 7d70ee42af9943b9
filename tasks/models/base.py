"""What every model family shares: the architecture record a checkpoint carries, and the classifier head.

An `Arch` lists every layer's size explicitly, so compression can describe a smaller model (fewer
channels, narrower layers) as just another `Arch` and rebuild it physically.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn


def load_tensors(path: Path) -> object:
    """`torch.load` of tensors and plain containers only, never an unrestricted unpickle. A file
    holding other pickled objects is a ValueError saying which, without PyTorch's own advice to
    retry with the unsafe loader, which this project must never give."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        raise ValueError(
            f"{path} holds pickled Python objects{f' ({found.group(1)})' if found else ''}, which "
            "modelforge never unpickles; save tensors only: torch.save(model.state_dict(), path) or "
            "safetensors"
        ) from None


@dataclass(frozen=True)
class Arch:
    family: str  # a key of tasks.models.FAMILIES
    num_classes: int
    input_shape: tuple[int, ...]  # (C, H, W) for images, (features,) for tables, (tokens,) for texts
    conv: tuple[int, ...] = ()  # output channels per conv block (cnn) or residual stage (resnet)
    hidden: tuple[int, ...] = field(default=(64,))  # widths of the hidden Linear layers
    activation: str = "relu"
    dropout: float = 0.0  # after every hidden activation; identity in eval mode and in the exported graph
    kernel: int = 3  # conv kernel size (odd: "same" padding)
    vocab: int = 0  # text only: token ids 0..vocab-1 (0 padding, 1 unknown word)
    embed: int = 0  # text only: word-embedding width
    spec: str = ""  # custom only: the user's "package.module:function"
    weights: str = ""  # custom only: pretrained weights (state_dict or safetensors) loaded once built
    layers: tuple[int, ...] = ()  # hf only: the pretrained transformer layers kept, by index (empty: all)

    @staticmethod
    def _optional(d: dict) -> dict:
        """The defaulted fields `d` sets: older checkpoints and narrower search spaces leave them out."""
        found = {
            k: d[k]
            for k in ("activation", "dropout", "kernel", "vocab", "embed", "spec", "weights", "layers")
            if k in d
        }
        return {**found, "layers": tuple(found["layers"])} if "layers" in found else found

    def scaled(self, factor: float, depth: int | None = None) -> Arch:
        """A proportionally narrower (and optionally shallower) variant, for distillation students."""
        conv = tuple(max(1, round(c * factor)) for c in self.conv)
        hidden = tuple(max(1, round(h * factor)) for h in self.hidden)
        if depth is not None:
            if self.conv:
                conv = (conv + (conv[-1:] * depth))[:depth]
            else:
                hidden = (hidden + (hidden[-1:] * depth))[:depth]
        return replace(self, conv=conv, hidden=hidden)

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> Arch:
        return Arch(
            d["family"],
            d["num_classes"],
            tuple(d["input_shape"]),
            tuple(d["conv"]),
            tuple(d["hidden"]),
            **Arch._optional(d),
        )


ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


def activation(arch: Arch) -> type[nn.Module]:
    if arch.activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {arch.activation!r}; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[arch.activation]


def head(features: int, arch: Arch) -> list[nn.Module]:
    """Flatten, the hidden Linear layers (activation, optional dropout), then the classifier."""
    layers: list[nn.Module] = [nn.Flatten()]
    for width in arch.hidden:
        layers += [nn.Linear(features, width), activation(arch)()]
        if arch.dropout > 0:
            layers.append(nn.Dropout(arch.dropout))
        features = width
    return [*layers, nn.Linear(features, arch.num_classes)]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def vocab_of(manifest: dict) -> int:
    """The token-id range of a text data set (0 for data without a vocabulary)."""
    preprocessing = manifest.get("preprocessing")
    return int(preprocessing.get("vocab_size", 0)) if isinstance(preprocessing, dict) else 0
