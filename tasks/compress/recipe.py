"""Recipes: a candidate is a list of steps applied in order to the trained FP32 baseline.

Torch steps (pruning, distillation) produce a checkpoint; ONNX steps (quantization) produce an ONNX
file. The model is exported once, at the first ONNX step or at the end, so parity is always measured
against the PyTorch model that was exported. Adding a method = one module in this package (its config
above its handler) + one line in the `Step` union below + its entry in the shared handler test.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated

from prefect import task
from pydantic import Field

from tasks.compress.base import (
    HANDLERS,
    Candidate,
    CompressContext,
    ModelState,
    Recipes,
    export_state,
)
from tasks.compress.binarize import Binarize
from tasks.compress.convert_fp16 import ConvertFp16
from tasks.compress.distill import Distill
from tasks.compress.magnitude_prune import MagnitudePrune
from tasks.compress.quantize_aware import QuantizeAware
from tasks.compress.quantize_dynamic import QuantizeDynamic
from tasks.compress.quantize_static import QuantizeStatic
from tasks.compress.sparsity_train import SparsityTrain
from tasks.compress.structured_prune import StructuredPrune
from tasks.data import load_splits
from tasks.train.stage import TrainConfig

Step = Annotated[
    MagnitudePrune
    | StructuredPrune
    | Distill
    | Binarize
    | SparsityTrain
    | QuantizeDynamic
    | QuantizeStatic
    | QuantizeAware
    | ConvertFp16,
    Field(discriminator="method"),
]


def _default_candidates() -> dict[str, list]:
    return {
        "pruned": [MagnitudePrune(method="magnitude_prune")],
        "student": [Distill(method="distill")],
        "int8_dynamic": [QuantizeDynamic(method="quantize_dynamic")],
        "int8_static": [QuantizeStatic(method="quantize_static")],
    }


class CompressConfig(Recipes):
    candidates: dict[str, list[Step]] = Field(
        default_factory=_default_candidates,
        description="Candidate name -> recipe: steps applied in order to the trained FP32 baseline.",
    )


def compress(checkpoint: Path, recipe: list, ctx: CompressContext) -> ModelState:
    """Apply `recipe` (a list of step configs) to `checkpoint` and return the exported result."""
    state = ModelState(checkpoint=Path(checkpoint))
    for step in recipe:
        handler = HANDLERS.get(step.method)
        if handler is None:
            raise ValueError(f"unknown compression method {step.method!r}; known: {sorted(HANDLERS)}")
        if step.on_onnx and state.onnx is None:
            state = export_state(state, ctx)
        state = handler(state, step, ctx)
    return state if state.onnx is not None else export_state(state, ctx)


def compress_candidate(
    name: str, recipe: list, baseline: Path, data_dir: Path, train: TrainConfig, out_dir: Path
) -> Candidate:
    """One candidate end to end: its recipe on the baseline, written under `out_dir/name`."""
    ctx = CompressContext(load_splits(data_dir), train, Path(baseline), Path(out_dir) / name)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    print(f"[compress] {name}: {' -> '.join(s.method for s in recipe) or 'export only'}")
    state = compress(baseline, copy.deepcopy(recipe), ctx)
    assert state.onnx is not None  # `compress` ends with the export
    return Candidate(name, state.onnx, state.checkpoint, state.parity_max_abs, state.info)


compress_candidate_task = task(name="compress_candidate", task_run_name="compress-{name}")(compress_candidate)
