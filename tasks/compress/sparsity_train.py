"""Training with an L1 penalty that drives channels or weights towards zero before pruning."""

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
    prunable,
    register,
    train_params,
)
from tasks.models import load_checkpoint, save_checkpoint
from tasks.train.loop import accuracy, fit


class SparsityTrain(Finetuned):
    method: Literal["sparsity_train"]
    target: Literal["channels", "weights"] = Field(
        "channels",
        description="channels: group L1 (the sum of every conv filter's / hidden neuron's weight L2 "
        "norm, as network slimming does on BatchNorm scales) drives whole channels to zero before "
        "structured_prune; weights: plain L1, before magnitude_prune.",
    )
    penalty: float = Field(1e-3, gt=0, description="Weight of the L1 term beside the cross-entropy.")
    finetune_epochs: int = Field(10, ge=1, description="Fine-tuning epochs with the penalty.")
    finetune_lr_scale: float = Field(0.5, gt=0, description="Fine-tuning lr as a multiple of the baseline's lr.")


def _channel_norms(model: nn.Module) -> list[torch.Tensor]:
    """L2 norm of every conv filter / hidden neuron (the classifier's rows are classes, not channels)."""
    return [layer.weight.flatten(1).norm(dim=1) for layer in layers_of(model)[:-1]]


@register("sparsity_train")
def sparsity_train(state: ModelState, cfg: SparsityTrain, ctx: CompressContext) -> ModelState:
    """Fine-tune with an L1 penalty: on channel norms (group lasso, driving whole filters/neurons
    towards zero, so a following structured_prune removes channels that carry little) or on the
    weights themselves (ahead of magnitude_prune). The last epoch is kept: the penalty's effect
    builds up over the run."""
    model, arch, meta = load_checkpoint(state.checkpoint)
    if cfg.target == "channels":
        l1 = lambda: sum(n.sum() for n in _channel_norms(model))
    else:
        l1 = lambda: sum(w.abs().sum() for w in prunable(model))

    def penalised(logits: torch.Tensor, _x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits, y) + cfg.penalty * l1()

    acc_before = accuracy(model, *ctx.splits.val)
    fit(
        model,
        ctx.splits.train,
        ctx.splits.val,
        train_params(ctx, meta, cfg.finetune_epochs, cfg.finetune_lr_scale),
        loss_fn=penalised,
        restore_best=False,
    )
    with torch.no_grad():
        norms = torch.cat(_channel_norms(model))
        weights = torch.cat([w.abs().flatten() for w in prunable(model)])
    info = {
        "target": cfg.target,
        "penalty": cfg.penalty,
        "val_acc_before": acc_before,
        "val_acc_after": accuracy(model, *ctx.splits.val),
        # "near zero": under 5% of the largest channel norm / weight
        "channels_near_zero": float((norms < 0.05 * norms.max()).float().mean()),
        "weights_near_zero": float((weights < 0.05 * weights.max()).float().mean()),
    }
    ckpt = save_checkpoint(ctx.out_dir / "sparse.pt", model, arch, {**meta, "sparsity_train": info})
    print(
        f"[compress] sparsity_train ({cfg.target}, penalty {cfg.penalty}): {info['channels_near_zero']:.0%} of "
        f"channels and {info['weights_near_zero']:.0%} of weights near zero, val acc {acc_before:.4f} -> "
        f"{info['val_acc_after']:.4f}"
    )
    return replace(state, checkpoint=ckpt, info={**state.info, "sparsity_train": info})
