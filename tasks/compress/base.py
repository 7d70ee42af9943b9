"""What every compression method shares: the step config bases, where a candidate stands (ModelState),
its context, the handler registry, and the helpers several methods use.

A method is one module holding its config class (a `StepConfig` with a `method` literal) directly above
its handler, registered with `@register(method)`; `on_onnx` on the config says whether it acts on the
exported graph (then the model is exported first) or on the PyTorch checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.nn.utils import parametrize

from tasks.core.settings import Section
from tasks.data import Splits
from tasks.models import count_params, load_checkpoint
from tasks.onnx.export import export_onnx
from tasks.train.loop import TrainParams
from tasks.train.stage import TrainConfig


class StepConfig(Section):
    """A compression step; `method` selects its handler in the pipeline's registry."""

    on_onnx: ClassVar[bool] = False  # acts on the exported graph (the model is exported before it), not on torch


class Finetuned(StepConfig):
    finetune_epochs: int = Field(5, ge=0, description="Fine-tuning epochs after the step.")
    finetune_lr_scale: float = Field(0.1, gt=0, description="Fine-tuning lr as a multiple of the baseline's lr.")


class Recipes(Section):
    """Candidate name -> recipe (the subclass declares `candidates` with its pipeline's step union)."""

    if TYPE_CHECKING:  # declared for the checker only: each subclass's field carries its own step union
        candidates: dict[str, list[Any]]

    @model_validator(mode="after")
    def _recipes_valid(self) -> Recipes:
        problems = []
        for name, steps in self.candidates.items():
            if name == "baseline":
                problems.append("'baseline' is reserved for the uncompressed FP32 model")
            if not steps:
                problems.append(f"candidate {name!r}: empty recipe")
            kinds = [s.on_onnx for s in steps]
            if kinds != sorted(kinds):
                problems.append(f"candidate {name!r}: torch steps cannot follow an ONNX step (quantize last)")
        if problems:
            raise ValueError("; ".join(problems))
        return self


@dataclass(frozen=True)
class ModelState:
    """Where a candidate stands in its recipe: a checkpoint until exported, then an ONNX file."""

    checkpoint: Path
    onnx: Path | None = None
    parity_max_abs: float | None = None  # ORT vs PyTorch at export; None once ONNX steps changed the graph
    info: dict = field(default_factory=dict)  # per-step facts (sparsity, params, calibration, ...)


@dataclass(frozen=True)
class CompressContext:
    splits: Splits
    train: TrainConfig
    teacher: Path  # the FP32 baseline checkpoint
    out_dir: Path  # this candidate's folder


@dataclass(frozen=True)
class Candidate:
    name: str
    onnx: Path
    checkpoint: Path
    parity_max_abs: float | None
    info: dict


Handler = Callable[[ModelState, object, CompressContext], ModelState]


HANDLERS: dict[str, Handler] = {}


def registrar(handlers: dict[str, Callable]):
    """A `@register(method)` decorator filling one pipeline's handler registry."""

    def register(method: str) -> Callable[[Callable], Callable]:
        def deco(fn: Callable) -> Callable:
            handlers[method] = fn
            return fn

        return deco

    return register


register = registrar(HANDLERS)


def train_params(ctx: CompressContext, meta: dict, epochs: int, lr_scale: float = 1.0) -> TrainParams:
    """The baseline's own training settings (from its checkpoint), with a new budget and lr scale; a
    compressed model trains whole (its head is not new, so nothing is frozen)."""
    base = {**meta["train"], "lr": meta["train"]["lr"] * lr_scale, "freeze_epochs": 0}
    return TrainParams.from_search(base, epochs, ctx.train.patience, ctx.train.seed)


def layers_of(model: nn.Module) -> list[nn.Conv2d | nn.Linear]:
    """Conv and Linear layers in forward order (build_model's order: convs, hiddens, classifier)."""
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def prunable(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in layers_of(model)]


@contextmanager
def weights_seen_through(layers: Sequence[nn.Module], make: Callable[[], nn.Module]) -> Iterator[None]:
    """Inside, every layer's weight is seen through a fresh `make()` parametrization (training updates
    the latent weight); on leaving, the parametrized value is baked into the plain weight."""
    for layer in layers:
        parametrize.register_parametrization(layer, "weight", make())
    yield
    for layer in layers:
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)


def export_state(state: ModelState, ctx: CompressContext) -> ModelState:
    model, _, _ = load_checkpoint(state.checkpoint)
    result = export_onnx(model, ctx.out_dir / "model.onnx", ctx.splits.test[0])
    return replace(
        state,
        onnx=result.path,
        parity_max_abs=result.parity_max_abs,
        info={**state.info, "params": count_params(model)},
    )
