"""1-bit weights with a per-channel scale, trained with a straight-through estimator."""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from tasks.compress.base import (
    CompressContext,
    Finetuned,
    ModelState,
    layers_of,
    register,
    train_params,
    weights_seen_through,
)
from tasks.models import count_params, load_checkpoint, save_checkpoint
from tasks.train.loop import accuracy, fit


class Binarize(Finetuned):
    method: Literal["binarize"]
    keep_first_last: bool = Field(
        True,
        description="Keep the first and the last layer in full precision (as "
        "XNOR-Net does): they hold few weights and much of the accuracy.",
    )
    finetune_epochs: int = Field(
        20, ge=1, description="Training epochs with binary weights (straight-through estimator)."
    )
    finetune_lr_scale: float = Field(0.5, gt=0, description="Training lr as a multiple of the baseline's lr.")


class _BinaryWeight(nn.Module):
    """Parametrization: sign(w) x alpha, alpha the mean |w| of each output channel (XNOR-Net's
    optimal scale). The backward pass is the identity on w (straight-through estimator), so the
    latent full-precision weights keep learning while every forward pass sees binary ones."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        alpha = w.detach().abs().flatten(1).mean(1).view(-1, *[1] * (w.dim() - 1))
        return w + (torch.where(w >= 0, alpha, -alpha) - w).detach()


@register("binarize")
def binarize(state: ModelState, cfg: Binarize, ctx: CompressContext) -> ModelState:
    """1-bit weights with a per-channel scale, trained with a straight-through estimator, then baked
    in. ONNX Runtime has no 1-bit kernels: the exported graph stores the +-alpha values as float32
    and runs at float speed; `info` states the size the weights would take packed to one bit."""
    model, arch, meta = load_checkpoint(state.checkpoint)
    layers = layers_of(model)
    chosen = layers[1:-1] if cfg.keep_first_last else layers
    if not chosen:
        raise ValueError(
            f"binarize: the model has {len(layers)} conv/linear layers; with keep_first_last nothing "
            "is left to binarize"
        )
    with weights_seen_through(chosen, _BinaryWeight):
        acc_binary = accuracy(model, *ctx.splits.val)
        fit(
            model, ctx.splits.train, ctx.splits.val, train_params(ctx, meta, cfg.finetune_epochs, cfg.finetune_lr_scale)
        )
    binary = sum(layer.weight.numel() for layer in chosen)
    scales = sum(layer.weight.shape[0] for layer in chosen)
    bits = binary + 32 * (scales + count_params(model) - binary)
    info = {
        "layers_binarized": len(chosen),
        "binary_weights": binary,
        "params": count_params(model),
        "packed_bits": bits,
        "packed_bytes": -(-bits // 8),
        "float32_bytes": 4 * count_params(model),
        "val_acc_binarized": acc_binary,
        "val_acc_trained": accuracy(model, *ctx.splits.val),
    }
    ckpt = save_checkpoint(ctx.out_dir / "binary.pt", model, arch, {**meta, "binarize": info})
    print(
        f"[compress] binarize: {binary} of {count_params(model)} weights in {len(chosen)} layers are 1-bit "
        f"({info['packed_bytes']} bytes packed vs {info['float32_bytes']} float32; ORT stores and runs them as "
        f"float32), val acc {acc_binary:.4f} -> {info['val_acc_trained']:.4f} after {cfg.finetune_epochs} epochs"
    )
    return replace(state, checkpoint=ckpt, info={**state.info, "binarize": info})
