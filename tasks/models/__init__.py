"""Model families behind one registry, and the checkpoints that rebuild any of them.

A family is one module here plus one entry below: how a search trial's parameters become an
`Arch` (`arch`) and how an `Arch` becomes a module (`build`). `rebuilds` says whether structured
pruning may rebuild the family from a narrower `Arch` (mlp, cnn); every other family is pruned in
place through Torch-Pruning's dependency graph, and its checkpoint records the pruned shapes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from tasks.core.settings import Section
from tasks.models.base import Arch, count_params, load_tensors, vocab_of
from tasks.models.cnn import build_cnn, cnn_arch
from tasks.models.custom import build_custom, custom_arch
from tasks.models.hf import build_hf, hf_arch, shallower_twin
from tasks.models.mlp import build_mlp, mlp_arch
from tasks.models.resnet import build_resnet, resnet_arch
from tasks.models.text import build_text, text_arch

Optimizer = Literal["sgd", "momentum", "adam", "adamw"]


Schedule = Literal["constant", "cosine", "step"]


Activation = Literal["relu", "gelu", "silu", "tanh"]


class ModelConfig(Section):
    """A user's own PyTorch module instead of the built-in families; the search then tunes its training."""

    spec: str | None = Field(
        None,
        description="'package.module:function': function(num_classes, input_shape) "
        "returns an nn.Module mapping a float batch to [batch, num_classes] logits. Imported "
        "from the project folder or an installed package.",
    )
    weights: Path | None = Field(
        None,
        description="Pretrained weights for spec: a state_dict saved with torch.save, "
        "or .safetensors (never a pickled model); every trial and the final training start "
        "from them.",
    )
    pretrained: str | None = Field(
        None,
        description="Fine-tune a Hugging Face classifier instead: for texts 'minilm' "
        "(the packaged all-MiniLM-L6-v2) or a local folder with config.json, weights and "
        "tokenizer.json (data.tokenizer names it too); for an image folder a local image "
        "classifier's folder (config.json and weights, e.g. a ViT at data.image_size).",
    )

    @model_validator(mode="after")
    def _spec_valid(self) -> ModelConfig:
        problems = []
        if self.spec is not None and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", self.spec):
            problems.append(f"spec {self.spec!r} is not 'package.module:function'")
        if self.weights is not None and self.spec is None:
            problems.append("weights need a spec (the module they belong to)")
        if self.spec is not None and self.pretrained is not None:
            problems.append("spec and pretrained name two different models; set one")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def family(self) -> str | None:
        """The model family the section names (custom, hf); None: the search picks a built-in one."""
        return "custom" if self.spec else "hf" if self.pretrained else None

    def fixed_params(self) -> dict:
        """What rebuilds the named model beside the searched settings; every trial carries it."""
        if self.spec:
            return {"spec": self.spec, "weights": str(self.weights or "")}
        return {"pretrained": self.pretrained} if self.pretrained else {}


__all__ = [
    "FAMILIES",
    "Arch",
    "arch_from_params",
    "build_model",
    "count_params",
    "load_checkpoint",
    "save_checkpoint",
    "vocab_of",
]


@dataclass(frozen=True)
class Family:
    arch: Callable[[dict, int, tuple[int, ...], int], Arch]  # (trial params, classes, input shape, vocab) -> Arch
    build: Callable[[Arch], nn.Module]
    rebuilds: bool = False  # structured pruning may rebuild it from a narrower Arch
    images: bool = False  # needs [C, H, W] samples
    builtin: bool = True  # searched from the space; False: the model section names the model (spec, pretrained)
    scales: bool = True  # `Arch.scaled` describes a narrower twin, the default distillation student
    # (teacher, its Arch, depth or None) -> (student, its Arch): a shallower twin made from the teacher itself
    shallower: Callable[[Any, Arch, int | None], tuple[nn.Module, Arch]] | None = (
        None  # Any: the family's own model class
    )


FAMILIES: dict[str, Family] = {
    "mlp": Family(mlp_arch, build_mlp, rebuilds=True),
    "cnn": Family(cnn_arch, build_cnn, rebuilds=True, images=True),
    "resnet": Family(resnet_arch, build_resnet, images=True),
    "text": Family(text_arch, build_text),
    "custom": Family(custom_arch, build_custom, builtin=False, scales=False),
    "hf": Family(hf_arch, build_hf, builtin=False, scales=False, shallower=shallower_twin),
}


def arch_from_params(p: dict, num_classes: int, input_shape, vocab: int = 0) -> Arch:
    """The architecture a search trial (or its chosen parameters) describes."""
    if p["family"] not in FAMILIES:
        raise ValueError(f"unknown model family {p['family']!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[p["family"]].arch(p, num_classes, tuple(input_shape), vocab)


def build_model(arch: Arch) -> nn.Module:
    if arch.family not in FAMILIES:
        raise ValueError(f"unknown model family {arch.family!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[arch.family].build(arch)


# Module attributes that hold a layer's size: in-place pruning changes them with the tensors, and
# some forwards read them (LayerNorm's normalized_shape, attention's head counts).
SIZE_ATTRS = (
    "in_channels",
    "out_channels",
    "in_features",
    "out_features",
    "num_features",
    "normalized_shape",
    "num_embeddings",
    "embedding_dim",
    "groups",
    "num_heads",
    "num_attention_heads",
    "attention_head_size",
    "all_head_size",
    "head_dim",
    "embed_dim",
    "hidden_size",
)


def _sizes(model: nn.Module) -> dict[str, dict]:
    return {
        name: {a: getattr(m, a) for a in SIZE_ATTRS if isinstance(getattr(m, a, None), (int, tuple))}
        for name, m in model.named_modules()
    }


def _resize(model: nn.Module, state: dict[str, torch.Tensor], sizes: dict[str, dict]) -> None:
    """Give the freshly built model the saved (pruned) shapes, so `state` loads into it."""
    own = model.state_dict()
    for key, tensor in state.items():
        if key in own and own[key].shape != tensor.shape:
            owner, _, attr = key.rpartition(".")
            module = model.get_submodule(owner)
            old = getattr(module, attr)
            new = torch.empty_like(tensor)
            setattr(module, attr, nn.Parameter(new, old.requires_grad) if isinstance(old, nn.Parameter) else new)
    for name, attrs in sizes.items():
        module = model.get_submodule(name) if name else model
        for attr, value in attrs.items():
            if getattr(module, attr, None) != (value := tuple(value) if isinstance(value, list) else value):
                setattr(module, attr, value)


def save_checkpoint(path: Path, model: nn.Module, arch: Arch, meta: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"arch": arch.to_dict(), "state_dict": model.state_dict(), "sizes": _sizes(model), "meta": meta}, tmp)
    tmp.replace(path)
    return path


def load_checkpoint(path: Path) -> tuple[nn.Module, Arch, dict]:
    """Rebuild the model from a checkpoint; any unreadable or inconsistent file is one clear error."""
    path = Path(path)
    try:
        ckpt = load_tensors(path)
        if not isinstance(ckpt, dict):
            raise TypeError(f"a {type(ckpt).__name__}, not a dict")
        arch = Arch.from_dict(ckpt["arch"])
        model = build_model(arch)
        _resize(model, ckpt["state_dict"], ckpt.get("sizes", {}))
        model.load_state_dict(ckpt["state_dict"])
    except FileNotFoundError:
        raise ValueError(f"checkpoint {path} does not exist") from None
    except Exception as err:  # torch raises many types for corrupt files
        raise ValueError(f"checkpoint {path} is not a readable modelforge checkpoint: {err}") from None
    return model.eval(), arch, ckpt.get("meta", {})
