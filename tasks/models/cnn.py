"""`cnn`: conv blocks (conv-act-maxpool while the map is >= 2 px), then an MLP head."""

from __future__ import annotations

from torch import nn

from tasks.models.base import Arch, activation, head


def image_shape(arch: Arch) -> tuple[int, int, int]:
    if len(arch.input_shape) != 3:
        raise ValueError(f"a {arch.family} needs [channels, height, width] samples, not {list(arch.input_shape)}")
    return arch.input_shape


def cnn_arch(p: dict, num_classes: int, input_shape: tuple[int, ...], vocab: int) -> Arch:
    """Channels double per block; one hidden layer of `width`."""
    conv = tuple(p["channels"] * 2**i for i in range(p["depth"]))
    return Arch("cnn", num_classes, input_shape, conv, (p["width"],), **Arch._optional(p))


def build_cnn(arch: Arch) -> nn.Sequential:
    c, h, w = image_shape(arch)
    layers: list[nn.Module] = []
    for out in arch.conv:
        layers += [nn.Conv2d(c, out, arch.kernel, padding=arch.kernel // 2), activation(arch)()]
        if min(h, w) >= 2:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        c = out
    return nn.Sequential(*layers, *head(c * h * w, arch))
