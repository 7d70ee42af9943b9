"""`mlp`: fully connected layers on the flattened sample (tables, or images as pixels)."""

from __future__ import annotations

import math

from torch import nn

from tasks.models.base import Arch, head


def mlp_arch(p: dict, num_classes: int, input_shape: tuple[int, ...], vocab: int) -> Arch:
    return Arch("mlp", num_classes, input_shape, (), (p["width"],) * p["depth"], **Arch._optional(p))


def build_mlp(arch: Arch) -> nn.Sequential:
    return nn.Sequential(*head(math.prod(arch.input_shape), arch))  # an MLP takes any sample shape
