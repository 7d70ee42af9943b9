"""`resnet`: a residual CNN with BatchNorm for images. A conv stem, then one residual block per
stage (two 3x3 conv + BatchNorm, a 1x1 projection on the skip path when the shape changes), each
stage after the first halving the map, then global average pooling and the head."""

from __future__ import annotations

import torch
from torch import nn

from tasks.models.base import Arch, activation, head
from tasks.models.cnn import image_shape


class ResidualBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, act: type[nn.Module]):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.act = act()
        self.skip = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        return self.act(self.bn2(self.conv2(out)) + self.skip(x))


def resnet_arch(p: dict, num_classes: int, input_shape: tuple[int, ...], vocab: int) -> Arch:
    """`depth` stages, channels doubling per stage from `channels`; the classifier sits on the pooled
    features (no hidden layer: the stages are the capacity)."""
    conv = tuple(p["channels"] * 2**i for i in range(p["depth"]))
    return Arch("resnet", num_classes, input_shape, conv, (), **Arch._optional(p))


def build_resnet(arch: Arch) -> nn.Sequential:
    c, h, w = image_shape(arch)
    act = activation(arch)
    stem = [nn.Conv2d(c, arch.conv[0], 3, 1, 1, bias=False), nn.BatchNorm2d(arch.conv[0]), act()]
    blocks, c = [], arch.conv[0]
    for i, out in enumerate(arch.conv):
        stride = 2 if i and min(h, w) >= 2 else 1
        h, w = (h + 1) // stride, (w + 1) // stride
        blocks.append(ResidualBlock(c, out, stride, act))
        c = out
    return nn.Sequential(*stem, *blocks, nn.AdaptiveAvgPool2d(1), *head(c, arch))
