"""ONNX Runtime dynamic INT8 (weights INT8, activations quantized on the fly)."""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar, Literal

from pydantic import Field

from tasks.compress.base import CompressContext, ModelState, StepConfig, register
from tasks.compress.ort_quant import preprocessed


class QuantizeDynamic(StepConfig):
    on_onnx: ClassVar[bool] = True
    method: Literal["quantize_dynamic"]
    per_channel: bool = Field(False, description="Per-channel weight scales.")


@register("quantize_dynamic")
def quantize_dynamic(state: ModelState, cfg: QuantizeDynamic, ctx: CompressContext) -> ModelState:
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    out = ctx.out_dir / "int8_dynamic.onnx"
    ort_quantize_dynamic(
        str(preprocessed(state, ctx)), str(out), weight_type=QuantType.QInt8, per_channel=cfg.per_channel
    )
    return replace(
        state, onnx=out, parity_max_abs=None, info={**state.info, "quantize_dynamic": {"per_channel": cfg.per_channel}}
    )
