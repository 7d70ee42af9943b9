"""ONNX Runtime static INT8 (QDQ), calibrated, with accuracy-aware fallback of sensitive nodes."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from tasks.compress.base import CompressContext, ModelState, StepConfig, register
from tasks.compress.ort_quant import (
    calibration_set,
    cpu_has_vnni,
    preprocessed,
    quantize_qdq,
    rank_nodes_by_error,
)
from tasks.onnx.runtime import make_session, onnx_accuracy


class QuantizeStatic(StepConfig):
    on_onnx: ClassVar[bool] = True
    method: Literal["quantize_static"]
    calibration_samples: int = Field(256, ge=1, description="Training samples fed to the calibrator.")
    calibrate_method: Literal["minmax", "entropy", "percentile"] = Field(
        "minmax", description="Activation range estimator."
    )
    per_channel: bool = Field(True, description="Per-channel weight scales.")
    max_accuracy_loss: float | None = Field(
        None,
        ge=0,
        description="Accuracy-aware tuning: allowed val-accuracy loss (points) vs FP32; nodes fall back "
        "to FP32, most sensitive first, until it holds. None = quantize everything.",
    )
    max_fallback_nodes: int = Field(8, ge=1, description="Most nodes accuracy-aware tuning may keep in FP32.")


@register("quantize_static")
def quantize_static(state: ModelState, cfg: QuantizeStatic, ctx: CompressContext) -> ModelState:
    """QDQ INT8 with calibration. With `max_accuracy_loss`, nodes whose INT8 output strays most from
    FP32 fall back to FP32 one at a time until the val-accuracy loss is within bounds; the best
    model seen is kept even if the bound is never met."""
    calib = calibration_set(ctx, cfg.calibration_samples, "quantize_static")
    reduce_range = not cpu_has_vnni()
    fp32 = preprocessed(state, ctx)

    def quantize(exclude: list[str], out: Path) -> float:
        quantize_qdq(fp32, out, calib, cfg.per_channel, cfg.calibrate_method, exclude)
        return onnx_accuracy(make_session(out), *ctx.splits.val)

    out = ctx.out_dir / "int8_static.onnx"
    acc = quantize([], out)
    fp32_acc = onnx_accuracy(make_session(fp32), *ctx.splits.val)
    info: dict[str, Any] = {
        "calibration_samples": len(calib),
        "calibrate_method": cfg.calibrate_method,
        "per_channel": cfg.per_channel,
        "reduce_range": reduce_range,
        "val_acc_fp32": fp32_acc,
        "val_acc_int8_full": acc,
        "nodes_excluded": [],
    }
    loss = lambda a: (fp32_acc - a) * 100
    if cfg.max_accuracy_loss is not None and loss(acc) > cfg.max_accuracy_loss:
        ranking = rank_nodes_by_error(fp32, out, calib[:64], ctx.out_dir)
        info["node_sqnr_loss_db"] = dict(ranking)
        best_acc, best_excluded, excluded = acc, [], []
        for node, sqnr in ranking[: cfg.max_fallback_nodes]:
            excluded.append(node)
            trial = ctx.out_dir / f"int8_fallback_{len(excluded)}.onnx"
            trial_acc = quantize(list(excluded), trial)
            print(
                f"[compress] quantize_static: FP32 fallback of {node} (loses {sqnr:.1f} dB SQNR): "
                f"val acc {trial_acc:.4f} "
                f"(loss {loss(trial_acc):.2f} pts, allowed {cfg.max_accuracy_loss:.2f})"
            )
            if trial_acc > best_acc:
                best_acc, best_excluded = trial_acc, list(excluded)
                trial.replace(out)
            if loss(trial_acc) <= cfg.max_accuracy_loss:
                break
        acc = best_acc
        info["nodes_excluded"] = best_excluded
    info["val_acc_int8"] = acc
    info["accuracy_criterion_met"] = cfg.max_accuracy_loss is None or loss(acc) <= cfg.max_accuracy_loss
    return replace(state, onnx=out, parity_max_abs=None, info={**state.info, "quantize_static": info})
