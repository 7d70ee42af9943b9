"""Model families and checkpoints.

An `Arch` lists every layer's size explicitly, so compression can describe a smaller model (fewer
channels, narrower layers) as just another `Arch` and rebuild it physically.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn


@dataclass(frozen=True)
class Arch:
    family: str  # "mlp" | "cnn"
    num_classes: int
    input_shape: tuple[int, ...]  # (C, H, W) for images, (features,) for tables
    conv: tuple[int, ...] = ()  # output channels per conv block (cnn only)
    hidden: tuple[int, ...] = field(default=(64,))  # widths of the hidden Linear layers
    activation: str = "relu"
    dropout: float = 0.0  # after every hidden activation; identity in eval mode and in the exported graph
    kernel: int = 3  # conv kernel size (odd: "same" padding)
    vocab: int = 0  # text only: token ids 0..vocab-1 (0 padding, 1 unknown word)
    embed: int = 0  # text only: word-embedding width

    @staticmethod
    def _optional(d: dict) -> dict:
        """The defaulted fields `d` sets: older checkpoints and narrower search spaces leave them out."""
        return {k: d[k] for k in ("activation", "dropout", "kernel", "vocab", "embed") if k in d}

    @staticmethod
    def from_params(p: dict, num_classes: int, input_shape, vocab: int = 0) -> "Arch":
        """The architecture a search trial describes: family, depth, width, channels (+ optional
        activation, dropout, kernel). A CNN doubles its channels per block and has one hidden layer;
        a text model embeds words in `width` dimensions, then has `depth - 1` hidden layers."""
        extra = Arch._optional(p)
        shape = tuple(input_shape)
        if p["family"] == "cnn":
            conv = tuple(p["channels"] * 2**i for i in range(p["depth"]))
            return Arch("cnn", num_classes, shape, conv, (p["width"],), **extra)
        if p["family"] == "text":
            if vocab < 3:
                raise ValueError("the text family needs a text data set (a vocabulary); this data has none")
            return Arch("text", num_classes, shape, (), (p["width"],) * (p["depth"] - 1), vocab=vocab, embed=p["width"],
                        **extra)
        return Arch("mlp", num_classes, shape, (), (p["width"],) * p["depth"], **extra)

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
        return Arch(d["family"], d["num_classes"], tuple(d["input_shape"]), tuple(d["conv"]), tuple(d["hidden"]),
                    **Arch._optional(d))


ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class TokenBag(nn.Module):
    """Token ids (as floats: every stage and the exported graph take float inputs) -> the mean of
    their word embeddings. Padding (id 0) and words outside the vocabulary (id 1) are left out: no
    train text holds an unknown word when every train word is in the vocabulary, so that embedding
    would be untrained noise at serving time."""

    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = x.long()
        mask = (ids > 1).unsqueeze(-1).to(self.embed.weight.dtype)
        return (self.embed(ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def vocab_of(manifest: dict) -> int:
    """The token-id range of a text data set (0 for data without a vocabulary)."""
    preprocessing = manifest.get("preprocessing")
    return int(preprocessing.get("vocab_size", 0)) if isinstance(preprocessing, dict) else 0


def build_model(arch: Arch) -> nn.Sequential:
    """Conv blocks (conv-act-maxpool while the map is >= 2 px) then an MLP head."""
    if arch.activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {arch.activation!r}; known: {sorted(ACTIVATIONS)}")
    act = ACTIVATIONS[arch.activation]
    layers: list[nn.Module] = []
    if arch.family == "cnn":
        if len(arch.input_shape) != 3:
            raise ValueError(f"a cnn needs [channels, height, width] samples, not {list(arch.input_shape)}")
        c, h, w = arch.input_shape
        for out in arch.conv:
            layers += [nn.Conv2d(c, out, arch.kernel, padding=arch.kernel // 2), act()]
            if min(h, w) >= 2:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            c = out
        features = c * h * w
    elif arch.family == "text":
        layers.append(TokenBag(arch.vocab, arch.embed))
        features = arch.embed
    elif arch.family == "mlp":
        features = math.prod(arch.input_shape)  # an MLP takes any sample shape
    else:
        raise ValueError(f"unknown model family {arch.family!r} (expected 'mlp', 'cnn' or 'text')")
    layers.append(nn.Flatten())
    for width in arch.hidden:
        layers += [nn.Linear(features, width), act()]
        if arch.dropout > 0:
            layers.append(nn.Dropout(arch.dropout))
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
