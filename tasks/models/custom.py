"""`custom`: a user's own PyTorch module, named by `"package.module:function"` where
`function(num_classes, input_shape)` returns an `nn.Module` taking a float batch of `input_shape`
samples and returning `[batch, num_classes]` logits. Optional pretrained weights: a `state_dict`
saved with `torch.save` (read with `weights_only=True`, never an unrestricted pickle) or a
`.safetensors` file.

The module is imported from the project root (the run puts it on `sys.path`) or from an installed
package; workers on a cluster need the package installed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from tasks.core.fingerprint import import_current
from tasks.models.base import Arch, load_tensors


def custom_arch(p: dict, num_classes: int, input_shape: tuple[int, ...], vocab: int) -> Arch:
    """Nothing architectural is searched: the search carries the spec and weights in its parameters."""
    return Arch("custom", num_classes, input_shape, (), (), spec=p["spec"], weights=p.get("weights", ""))


def load_factory(spec: str) -> Callable[[int, tuple[int, ...]], nn.Module]:
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise ValueError(f"model spec {spec!r} is not 'package.module:function'")
    try:
        module = import_current(module_name)
    except Exception as err:  # a user's module may fail in any way while importing
        raise ValueError(f"model spec {spec!r}: cannot import {module_name!r}: {type(err).__name__}: {err}") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ValueError(f"model spec {spec!r}: {module_name!r} has no function {name!r}")
    try:
        inspect.signature(factory).bind(2, (1,))
    except TypeError:
        raise ValueError(
            f"model spec {spec!r}: {name}{inspect.signature(factory)} must take (num_classes, input_shape)"
        ) from None
    return factory


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from `.safetensors` or a `torch.save` file, loaded without running any code."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weights {path} do not exist")
    state: object
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = load_tensors(path)
    except Exception as err:  # torch and safetensors raise many types for foreign or corrupt files
        raise ValueError(
            f"weights {path} are not a state_dict (torch.save of model.state_dict(), or safetensors): {err}"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a modelforge checkpoint, or a trainer's {"state_dict": ...}
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weights {path} are not a state_dict of tensors")
    return state


def load_weights(model: nn.Module, path: Path) -> None:
    """Every tensor of the model from `path`, by name and shape; any difference is one clear error."""
    state, own = read_weights(path), model.state_dict()
    problems = [f"missing {k}" for k in own if k not in state] + [f"unexpected {k}" for k in state if k not in own]
    problems += [
        f"{k}: {tuple(state[k].shape)} in the file, {tuple(v.shape)} in the model"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise ValueError(f"weights {path} do not fit the model: {shown}")
    model.load_state_dict(state)


def build_custom(arch: Arch) -> nn.Module:
    model = load_factory(arch.spec)(arch.num_classes, tuple(arch.input_shape))
    if not isinstance(model, nn.Module):
        raise ValueError(f"model spec {arch.spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    if arch.weights:
        load_weights(model, Path(arch.weights))
    return model
