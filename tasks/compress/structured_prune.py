"""Structured pruning: whole channels and neurons removed, the layers rebuilt smaller."""

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
)
from tasks.compress.prune_graph import prune_channels
from tasks.models import (
    FAMILIES,
    build_model,
    count_params,
    load_checkpoint,
    save_checkpoint,
)
from tasks.train.loop import accuracy, fit


class StructuredPrune(Finetuned):
    method: Literal["structured_prune"]
    amount: float = Field(0.5, ge=0, lt=1, description="Fraction of channels/neurons removed from every hidden layer.")
    norm: Literal[1, 2] = Field(1, description="Rank channels/neurons by the L1 or L2 norm of their weights.")
    finetune_epochs: int = Field(10, ge=0, description="Fine-tuning epochs of the rebuilt, smaller model.")


@register("structured_prune")
def structured_prune(state: ModelState, cfg: StructuredPrune, ctx: CompressContext) -> ModelState:
    """Remove whole conv channels / hidden neurons (lowest weight norm) and rebuild physically
    smaller layers, so the exported graph itself shrinks and speeds up; then fine-tune."""
    model, arch, meta = load_checkpoint(state.checkpoint)
    if not FAMILIES[arch.family].rebuilds:
        return _prune_in_place(model, arch, meta, state, cfg, ctx)
    layers = layers_of(model)
    keep: list[torch.Tensor] = []
    for layer in layers[:-1]:
        scores = layer.weight.detach().flatten(1).norm(p=cfg.norm, dim=1)
        n_keep = max(1, round(len(scores) * (1 - cfg.amount)))
        keep.append(scores.topk(n_keep).indices.sort().values)
    keep.append(torch.arange(arch.num_classes))  # the classifier keeps every class
    n_conv = len(arch.conv)
    small_arch = replace(arch, conv=tuple(len(k) for k in keep[:n_conv]), hidden=tuple(len(k) for k in keep[n_conv:-1]))
    small = build_model(small_arch)
    prev = torch.arange(arch.input_shape[0])
    with torch.no_grad():
        for i, (old, new, rows) in enumerate(zip(layers, layers_of(small), keep, strict=True)):
            if i == n_conv:  # first Linear after Flatten: each kept channel owns a block of spatial inputs
                channels_in = arch.conv[-1] if n_conv else arch.input_shape[0]
                assert isinstance(old, nn.Linear)
                spatial = old.in_features // channels_in
                cols = (prev[:, None] * spatial + torch.arange(spatial)).flatten()
            else:
                cols = prev
            new.weight.copy_(old.weight[rows][:, cols])
            assert old.bias is not None and new.bias is not None  # build_model's layers all have biases
            new.bias.copy_(old.bias[rows])
            prev = rows
    info = {
        "params_before": count_params(model),
        "params_after": count_params(small),
        "arch_after": small_arch.to_dict(),
    }
    what = f"conv {arch.conv}->{small_arch.conv} hidden {arch.hidden}->{small_arch.hidden}"
    return _finetune_and_save(small, small_arch, meta, state, cfg, ctx, info, what)


def _prune_in_place(
    model: nn.Module, arch, meta: dict, state: ModelState, cfg: StructuredPrune, ctx: CompressContext
) -> ModelState:
    """Families with no narrower `Arch` to rebuild (residual nets, a user's module, text): Torch-Pruning
    removes coupled channel groups in place; the checkpoint records the pruned shapes."""
    example = torch.from_numpy(ctx.splits.val[0][:2])
    info = prune_channels(model, example, cfg.amount, cfg.norm)
    return _finetune_and_save(model, arch, meta, state, cfg, ctx, info, f"{arch.family}, dependency graph")


def _finetune_and_save(
    model: nn.Module,
    arch,
    meta: dict,
    state: ModelState,
    cfg: StructuredPrune,
    ctx: CompressContext,
    info: dict,
    what: str,
) -> ModelState:
    """The pruned `model` (`info`: its parameter counts before and after) fine-tuned and checkpointed."""
    acc_pruned = accuracy(model, *ctx.splits.val)
    if cfg.finetune_epochs:
        fit(
            model, ctx.splits.train, ctx.splits.val, train_params(ctx, meta, cfg.finetune_epochs, cfg.finetune_lr_scale)
        )
    info = {
        "amount": cfg.amount,
        **info,
        "val_acc_pruned": acc_pruned,
        "val_acc_finetuned": accuracy(model, *ctx.splits.val),
    }
    ckpt = save_checkpoint(ctx.out_dir / "structured.pt", model, arch, {**meta, "structured_prune": info})
    print(
        f"[compress] structured_prune ({what}): params {info['params_before']}->{info['params_after']}, "
        f"val acc {acc_pruned:.4f} -> {info['val_acc_finetuned']:.4f} after {cfg.finetune_epochs} fine-tune epochs"
    )
    return replace(state, checkpoint=ckpt, info={**state.info, "structured_prune": info})
