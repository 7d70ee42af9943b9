"""Unstructured magnitude pruning on an iterative schedule."""

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
    prunable,
    register,
    train_params,
)
from tasks.models import count_params, load_checkpoint, save_checkpoint
from tasks.train.loop import accuracy, fit


class MagnitudePrune(Finetuned):
    method: Literal["magnitude_prune"]
    sparsity: float = Field(0.5, ge=0, lt=1, description="Final fraction of conv/linear weights set to zero (by |w|).")
    scope: Literal["global", "layer"] = Field("global", description="Rank weights across all layers or within each.")
    steps: int = Field(
        1, ge=1, description="Iterative schedule: sparsity ramps up over this many prune+fine-tune steps."
    )
    finetune_epochs: int = Field(5, ge=0, description="Fine-tuning epochs after each step, with the mask held fixed.")


def _magnitude_masks(weights: list[torch.Tensor], sparsity: float, scope: str) -> list[torch.Tensor]:
    """Keep-masks zeroing the `sparsity` share of smallest |w|, ranked globally or per layer."""

    def threshold(values: torch.Tensor) -> torch.Tensor:
        k = int(sparsity * values.numel())
        return values.kthvalue(k).values if k > 0 else torch.tensor(-1.0)

    if scope == "global":
        t = threshold(torch.cat([w.abs().flatten() for w in weights]))
        return [(w.abs() > t).float() for w in weights]
    return [(w.abs() > threshold(w.abs().flatten())).float() for w in weights]


@register("magnitude_prune")
def magnitude_prune(state: ModelState, cfg: MagnitudePrune, ctx: CompressContext) -> ModelState:
    """Unstructured pruning on an iterative schedule: each step zeroes more of the smallest |w|
    (never reviving earlier zeros) and fine-tunes with the mask re-applied after every update."""
    model, arch, meta = load_checkpoint(state.checkpoint)
    masks: list[torch.Tensor] = []

    def apply_masks(m: nn.Module) -> None:
        with torch.no_grad():
            for w, mask in zip(prunable(m), masks, strict=True):
                w.mul_(mask)

    history = []
    for step in range(1, cfg.steps + 1):
        target = cfg.sparsity * step / cfg.steps
        masks = _magnitude_masks([w.detach() for w in prunable(model)], target, cfg.scope)
        apply_masks(model)
        acc_pruned = accuracy(model, *ctx.splits.val)
        if cfg.finetune_epochs:
            fit(
                model,
                ctx.splits.train,
                ctx.splits.val,
                train_params(ctx, meta, cfg.finetune_epochs, cfg.finetune_lr_scale),
                after_step=apply_masks,
            )
        history.append(
            {"sparsity": target, "val_acc_pruned": acc_pruned, "val_acc_finetuned": accuracy(model, *ctx.splits.val)}
        )
        print(
            f"[compress] magnitude_prune step {step}/{cfg.steps}: sparsity {target:.2f}, val acc "
            f"{acc_pruned:.4f} -> {history[-1]['val_acc_finetuned']:.4f} after {cfg.finetune_epochs} fine-tune epochs"
        )
    zeros = sum(int((w == 0).sum()) for w in prunable(model))
    total = sum(w.numel() for w in prunable(model))
    info = {
        "sparsity": zeros / total,
        "scope": cfg.scope,
        "steps": history,
        "params": count_params(model),
        "nonzero_params": count_params(model) - zeros,
    }
    ckpt = save_checkpoint(ctx.out_dir / "pruned.pt", model, arch, {**meta, "magnitude_prune": info})
    return replace(state, checkpoint=ckpt, info={**state.info, "magnitude_prune": info})
