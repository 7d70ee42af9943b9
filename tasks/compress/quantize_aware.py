"""Quantization-aware training, then a QDQ INT8 export."""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from tasks.compress.base import (
    CompressContext,
    Finetuned,
    ModelState,
    export_state,
    layers_of,
    register,
    train_params,
    weights_seen_through,
)
from tasks.compress.ort_quant import calibration_set, preprocessed, quantize_qdq
from tasks.models import load_checkpoint, save_checkpoint
from tasks.onnx.runtime import make_session, onnx_accuracy
from tasks.train.loop import accuracy, fit


class QuantizeAware(Finetuned):
    on_onnx: ClassVar[bool] = True
    method: Literal["quantize_aware"]
    finetune_epochs: int = Field(5, ge=1, description="Fine-tuning epochs with fake-quantized weights and activations.")
    calibration_samples: int = Field(256, ge=1, description="Training samples that calibrate the exported QDQ model.")
    per_channel: bool = Field(True, description="Per-channel weight scales (in training and in the export).")


class _FakeQuantWeight(nn.Module):
    """Parametrization: weights rounded to the symmetric int8 grid ORT's QDQ quantizer will use
    (scale = max |w| / 127, per output channel or per tensor), straight-through in the backward pass."""

    def __init__(self, per_channel: bool):
        super().__init__()
        self.per_channel = per_channel

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        peak = w.detach().abs().flatten(1).amax(1) if self.per_channel else w.detach().abs().max().expand(w.shape[0])
        scale = (peak.clamp_min(1e-8) / 127).view(-1, *[1] * (w.dim() - 1))
        return w + ((w / scale).round().clamp(-127, 127) * scale - w).detach()


def _fake_quant_inputs(layer: nn.Module, momentum: float = 0.1):
    """A pre-hook fake-quantizing the layer's input to int8 over its running min/max (what
    calibration will see), with torch's straight-through gradient."""
    state: dict[str, float] = {}  # the running "lo" and "hi", from the first batch on

    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        lo, hi = float(x.detach().min()), float(x.detach().max())
        if not state:
            state["lo"], state["hi"] = lo, hi
        elif module.training:
            state["lo"] += momentum * (lo - state["lo"])
            state["hi"] += momentum * (hi - state["hi"])
        lo, hi = min(state["lo"], 0.0), max(state["hi"], 0.0)
        scale = max(hi - lo, 1e-8) / 255
        zero = round(-128 - lo / scale)
        return (torch.fake_quantize_per_tensor_affine(x, scale, zero, -128, 127), *args[1:])

    return layer.register_forward_pre_hook(hook)


@register("quantize_aware")
def quantize_aware(state: ModelState, cfg: QuantizeAware, ctx: CompressContext) -> ModelState:
    """Quantization-aware training: fine-tune with every conv/linear weight on the int8 grid and every
    such layer's input fake-quantized, so the network learns to live with INT8 rounding; then bake
    the weights, export, and convert to QDQ INT8 with ORT's static quantizer (calibrated as
    quantize_static). For when post-training quantization loses too much accuracy."""
    model, arch, meta = load_checkpoint(state.checkpoint)
    layers = layers_of(model)
    with weights_seen_through(layers, lambda: _FakeQuantWeight(cfg.per_channel)):
        hooks = [_fake_quant_inputs(layer) for layer in layers]
        acc_fq = accuracy(model, *ctx.splits.val)
        fit(
            model, ctx.splits.train, ctx.splits.val, train_params(ctx, meta, cfg.finetune_epochs, cfg.finetune_lr_scale)
        )
        acc_trained = accuracy(model, *ctx.splits.val)
        for hook in hooks:
            hook.remove()
    ckpt = save_checkpoint(ctx.out_dir / "qat.pt", model, arch, {**meta, "quantize_aware": {}})
    exported = export_state(replace(state, checkpoint=ckpt), ctx)
    out = quantize_qdq(
        preprocessed(exported, ctx),
        ctx.out_dir / "int8_qat.onnx",
        calibration_set(ctx, cfg.calibration_samples, "quantize_aware"),
        cfg.per_channel,
    )
    info = {
        "val_acc_fake_quant_before": acc_fq,
        "val_acc_fake_quant_trained": acc_trained,
        "val_acc_int8": onnx_accuracy(make_session(out), *ctx.splits.val),
        "per_channel": cfg.per_channel,
    }
    print(
        f"[compress] quantize_aware: fake-quant val acc {acc_fq:.4f} -> {acc_trained:.4f} after "
        f"{cfg.finetune_epochs} epochs; exported INT8 val acc {info['val_acc_int8']:.4f}"
    )
    return replace(exported, onnx=out, parity_max_abs=None, info={**exported.info, "quantize_aware": info})
