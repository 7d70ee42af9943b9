"""Structured pruning of any model through Torch-Pruning's dependency graph: residual blocks,
BatchNorm, a user's own module. Channels are removed in coupled groups (a conv's outputs with the
BatchNorm after it, the skip path's projection and every consumer's inputs), so the result is a
physically smaller model of the same class, not a masked one."""

from __future__ import annotations

from typing import cast

import torch
from torch import nn


def classifier_layers(model: nn.Module, example: torch.Tensor) -> list[nn.Linear | nn.Conv2d]:
    """The layers that emit the logits: Linear or 1x1-conv outputs sized as the output's last axis.
    They keep every class."""
    with torch.no_grad():
        classes = model.eval()(example).shape[-1]
    return [
        m
        for m in model.modules()
        if (isinstance(m, nn.Linear) and m.out_features == classes)
        or (isinstance(m, nn.Conv2d) and m.out_channels == classes and m.kernel_size == (1, 1))
    ][-1:]


def attention_heads(model: nn.Module) -> dict[nn.Module, int]:
    """The query/key/value projections of every Hugging Face style self-attention, with its head count:
    their outputs are pruned a whole head at a time, so the attention still splits into heads."""
    heads = {}
    for m in model.modules():
        n = getattr(m, "num_attention_heads", None)
        if isinstance(n, int) and all(isinstance(getattr(m, a, None), nn.Linear) for a in ("query", "key", "value")):
            heads.update({getattr(m, a): n for a in ("query", "key", "value")})
    return heads


def _recount_heads(model: nn.Module) -> None:
    """A pruned attention reads its (fewer) heads from these attributes in its forward."""
    for m in model.modules():
        query = getattr(m, "query", None)
        if isinstance(getattr(m, "num_attention_heads", None), int) and isinstance(query, nn.Linear):
            m.all_head_size = query.out_features  # type: ignore[assignment]  # torch types module attributes as tensors/modules
            # plain ints on HF's attention; torch types any module attribute as a tensor or a module
            m.num_attention_heads = query.out_features // cast(int, m.attention_head_size)  # type: ignore[assignment]


def prune_channels(model: nn.Module, example: torch.Tensor, amount: float, norm: int) -> dict:
    """Remove `amount` of the channels/neurons of every prunable group, ranked by the group's weight
    norm (L1 or L2), in place; in a transformer, `amount` of each layer's attention heads and of its
    feed-forward channels (the hidden width every residual sum shares is kept). Returns the
    parameter counts before and after."""
    import torch_pruning as tp

    before = sum(p.numel() for p in model.parameters())
    heads = attention_heads(model)
    ignored = classifier_layers(model, example)
    if heads:  # the residual stream's width: Linear layers writing into it (attention and FFN outputs) keep it
        ignored += [
            m
            for m in model.modules()
            if isinstance(m, nn.Linear) and m not in heads and m.out_features == next(iter(heads)).in_features
        ]
    # Embeddings as roots too: a word-embedding width is a channel group like any layer's outputs.
    pruner = tp.pruner.MagnitudePruner(
        model,
        example,
        importance=tp.importance.MagnitudeImportance(p=norm),
        pruning_ratio=amount,
        ignored_layers=ignored,
        root_module_types=[nn.Conv2d, nn.Linear, nn.LSTM] + ([] if heads else [nn.Embedding]),
        num_heads=heads,
        prune_num_heads=bool(heads),
        prune_head_dims=False,
        head_pruning_ratio=amount,
    )
    pruner.step()
    _recount_heads(model)
    return {
        "params_before": before,
        "params_after": sum(p.numel() for p in model.parameters()),
        **({"attention_heads_after": sum(h for h in attention_heads(model).values()) // 3} if heads else {}),
    }
