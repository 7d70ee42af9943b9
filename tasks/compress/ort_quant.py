"""ONNX Runtime quantization helpers the INT8 methods share: the pre-pass, the calibration feed, QDQ
quantization and the per-node error ranking of accuracy-aware tuning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader

from tasks.compress.base import CompressContext, ModelState
from tasks.onnx.runtime import graph_feeds


def preprocessed(state: ModelState, ctx: CompressContext) -> Path:
    """ORT's recommended pre-pass (shape inference + graph cleanup) before quantizing."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = ctx.out_dir / "preprocessed.onnx"
    # auto_merge: an HF graph slices its position ids to min(max positions, tokens) on its dynamic
    # token axis, which ORT's symbolic inference cannot broadcast against `tokens` unless it may
    # merge the two. Without it the inference fails, and leaves sym_shape_infer_temp.onnx and its
    # weights in the working directory as it does.
    quant_pre_process(str(state.onnx), str(out), auto_merge=True)
    return out


def cpu_has_vnni() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


class _CalibrationReader(CalibrationDataReader):
    """Feeds samples one at a time, as the inputs of the graph at `model`, to the calibrator and the
    QDQ debugger."""

    def __init__(self, x: np.ndarray, model: Path):
        proto = onnx.load(str(model), load_external_data=False)
        weights = {w.name for w in proto.graph.initializer}
        names = [i.name for i in proto.graph.input if i.name not in weights]
        metadata = {p.key: p.value for p in proto.metadata_props}
        self._it = (graph_feeds(names, metadata, x[i : i + 1]) for i in range(len(x)))

    def get_next(self) -> dict | None:
        return next(self._it, None)


QUANTIZABLE_OPS = ("Conv", "Gemm", "MatMul")


def calibration_set(ctx: CompressContext, samples: int, method: str) -> np.ndarray:
    x_train = ctx.splits.train[0]
    if len(x_train) == 0:
        raise ValueError(f"{method}: the calibration set (training split) is empty")
    rng = np.random.default_rng(ctx.train.seed)
    return x_train[rng.permutation(len(x_train))[:samples]]


def quantize_qdq(
    fp32: Path,
    out: Path,
    calib: np.ndarray,
    per_channel: bool,
    calibrate_method: str = "minmax",
    exclude: list[str] | tuple = (),
) -> Path:
    """ORT static INT8 in QDQ format, calibrated on `calib`: signed 8-bit weights, unsigned 8-bit
    activations. ORT's CPU kernels take U8S8 whole: on the residual CNN every Conv and Add became
    QLinearConv/QLinearAdd, where with signed activations 6 of 9 Convs stayed FP32 between
    DequantizeLinear and QuantizeLinear."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[calibrate_method]
    # reduce_range: 7-bit weights avoid u8s8 overflow on CPUs without VNNI.
    ort_quantize_static(
        str(fp32),
        str(out),
        _CalibrationReader(calib, fp32),
        quant_format=QuantFormat.QDQ,
        per_channel=per_channel,
        reduce_range=not cpu_has_vnni(),
        nodes_to_exclude=list(exclude),
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=method,
    )
    return out


def rank_nodes_by_error(fp32: Path, int8: Path, x: np.ndarray, work: Path) -> list[tuple[str, float]]:
    """(node name, dB of SQNR lost across the node) for every Conv/Gemm/MatMul, worst first.

    SQNR compares a tensor in the INT8 model with the same tensor in the FP32 model on `x`. The
    drop from a node's input to its output is the error that node itself adds, so a late layer is
    not blamed for noise it merely inherited. ORT fuses Conv+Relu in QDQ graphs, so a node's output
    is observed at the first tensor down its single-consumer chain that both models expose.
    """
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_activation_error,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    fp32_aug, int8_aug = work / "fp32_debug.onnx", work / "int8_debug.onnx"
    modify_model_output_intermediate_tensors(str(fp32), str(fp32_aug))
    modify_model_output_intermediate_tensors(str(int8), str(int8_aug))
    matching = create_activation_matching(
        collect_activations(str(int8_aug), _CalibrationReader(x, fp32)),
        collect_activations(str(fp32_aug), _CalibrationReader(x, fp32)),
    )
    sqnr = {t: min(e["xmodel_err"], 100.0) for t, e in compute_activation_error(matching).items() if "xmodel_err" in e}
    nodes = onnx.load(str(fp32)).graph.node
    consumers: dict[str, list] = {}
    for node in nodes:
        for t in node.input:
            consumers.setdefault(t, []).append(node)

    def observed(tensor: str) -> float | None:
        while tensor not in sqnr:
            nxt = consumers.get(tensor, [])
            if len(nxt) != 1:
                return None
            tensor = nxt[0].output[0]
        return sqnr[tensor]

    ranked = []
    for node in nodes:
        if node.op_type in QUANTIZABLE_OPS:
            before, after = observed(node.input[0]), observed(node.output[0])
            if after is not None:
                ranked.append((node.name, (100.0 if before is None else before) - after))
    return sorted(ranked, key=lambda item: -item[1])
