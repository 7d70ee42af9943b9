"""Half-precision weights and compute."""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar, Literal

import onnx
from pydantic import Field

from tasks.compress.base import CompressContext, ModelState, StepConfig, register


class ConvertFp16(StepConfig):
    on_onnx: ClassVar[bool] = True
    method: Literal["convert_fp16"]
    keep_io_types: bool = Field(True, description="Keep float32 inputs/outputs so callers need no change.")


@register("convert_fp16")
def convert_fp16(state: ModelState, cfg: ConvertFp16, ctx: CompressContext) -> ModelState:
    """Half-precision weights and compute; float32 I/O kept by default so callers need no change."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    out = ctx.out_dir / "fp16.onnx"
    model = OnnxModel(convert_float_to_float16(onnx.load(str(state.onnx)), keep_io_types=cfg.keep_io_types))
    model.topological_sort()  # the converter appends its I/O Casts last, which onnx.checker rejects
    onnx.checker.check_model(model.model)
    onnx.save(model.model, str(out))
    return replace(
        state, onnx=out, parity_max_abs=None, info={**state.info, "convert_fp16": {"keep_io_types": cfg.keep_io_types}}
    )
