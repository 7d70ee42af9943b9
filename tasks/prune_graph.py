"""Structured pruning of any model through Torch-Pruning's dependency graph: residual blocks,
BatchNorm, a user's own module. Channels are removed in coupled groups (a conv's outputs with the
BatchNorm after it, the skip path's projection and every consumer's inputs), so the result is a
physically smaller model of the same class, not a masked one."""

from __future__ import annotations

import torch
from torch import nn


def classifier_layers(model: nn.Module, example: torch.Tensor) -> list[nn.Module]:
    """The layers that emit the logits: Linear or 1x1-conv outputs sized as the output's last axis.
    They keep every class."""
    with torch.no_grad():
        classes = model.eval()(example).shape[-1]
    return [m for m in model.modules()
            if (isinstance(m, nn.Linear) and m.out_features == classes)
            or (isinstance(m, nn.Conv2d) and m.out_channels == classes and m.kernel_size == (1, 1))][-1:]


def prune_channels(model: nn.Module, example: torch.Tensor, amount: float, norm: int) -> dict:
    """Remove `amount` of the channels/neurons of every prunable group, ranked by the group's weight
    norm (L1 or L2), in place. Returns the parameter counts before and after."""
    import torch_pruning as tp

    before = sum(p.numel() for p in model.parameters())
    # Embeddings as roots too: a word-embedding width is a channel group like any layer's outputs.
    pruner = tp.pruner.MagnitudePruner(model, example, importance=tp.importance.MagnitudeImportance(p=norm),
                                       pruning_ratio=amount, ignored_layers=classifier_layers(model, example),
                                       root_module_types=[nn.Conv2d, nn.Linear, nn.LSTM, nn.Embedding])
    pruner.step()
    return {"params_before": before, "params_after": sum(p.numel() for p in model.parameters())}
