"""Compression: every method is a config class (tasks.config) plus one handler registered here.

A candidate is a recipe of steps applied to the trained FP32 baseline. Torch steps (pruning,
distillation) produce a checkpoint; ONNX steps (quantization) produce an ONNX file. The model is
exported once, at the first ONNX step or at the end, so parity is always measured against the
PyTorch model that was exported. Adding a method = one config class + one `@register` function.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from prefect import task
from torch import nn

from tasks.build_model import build_model, count_params, load_checkpoint, save_checkpoint
from tasks.config import Distill, MagnitudePrune, QuantizeDynamic, QuantizeStatic, TrainConfig
from tasks.export_onnx import INPUT_NAME, export_onnx
from tasks.train_model import TrainParams, accuracy, fit
from tasks.version_data import Splits, load_splits


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


Handler = Callable[[ModelState, object, CompressContext], ModelState]
HANDLERS: dict[str, Handler] = {}
ONNX_METHODS: set[str] = set()


def register(method: str, onnx_level: bool = False) -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        HANDLERS[method] = fn
        if onnx_level:
            ONNX_METHODS.add(method)
        return fn

    return deco


def _train_params(ctx: CompressContext, meta: dict, epochs: int, lr_scale: float = 1.0) -> TrainParams:
    base = meta["train"]
    return TrainParams(base["lr"] * lr_scale, base["optimizer"], epochs, ctx.train.patience,
                       ctx.train.batch_size, ctx.train.weight_decay, ctx.train.seed)


def _prunable(model: nn.Module) -> list[nn.Parameter]:
    return [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@register("magnitude_prune")
def magnitude_prune(state: ModelState, cfg: MagnitudePrune, ctx: CompressContext) -> ModelState:
    """Global unstructured pruning: zero the smallest |w| across all conv/linear weights, then
    fine-tune with the mask re-applied after every step so pruned weights stay zero."""
    model, arch, meta = load_checkpoint(state.checkpoint)
    weights = _prunable(model)
    magnitudes = torch.cat([w.detach().abs().flatten() for w in weights])
    k = int(cfg.sparsity * magnitudes.numel())
    threshold = magnitudes.kthvalue(k).values if k > 0 else torch.tensor(-1.0)
    masks = [(w.detach().abs() > threshold).float() for w in weights]

    def apply_masks(m: nn.Module) -> None:
        with torch.no_grad():
            for w, mask in zip(_prunable(m), masks):
                w.mul_(mask)

    apply_masks(model)
    acc_before = accuracy(model, *ctx.splits.val)
    if cfg.finetune_epochs:
        fit(model, ctx.splits.train, ctx.splits.val, _train_params(ctx, meta, cfg.finetune_epochs, 0.1),
            after_step=apply_masks)
    zeros = sum(int((w == 0).sum()) for w in _prunable(model))
    total = sum(w.numel() for w in _prunable(model))
    info = {"sparsity": zeros / total, "val_acc_after_prune": acc_before, "val_acc_after_finetune": accuracy(model, *ctx.splits.val)}
    ckpt = save_checkpoint(ctx.out_dir / "pruned.pt", model, arch, {**meta, "magnitude_prune": info})
    print(f"[compress] magnitude_prune: sparsity {info['sparsity']:.2f}, val acc {acc_before:.4f} -> "
          f"{info['val_acc_after_finetune']:.4f} after {cfg.finetune_epochs} fine-tune epochs")
    return replace(state, checkpoint=ckpt, info={**state.info, "magnitude_prune": info})


@register("distill")
def distill(state: ModelState, cfg: Distill, ctx: CompressContext) -> ModelState:
    """Train a narrower student on temperature-scaled KL to the teacher's logits plus hard labels."""
    teacher, arch, meta = load_checkpoint(state.checkpoint)
    student_arch = arch.scaled(cfg.width_factor, cfg.depth)
    torch.manual_seed(ctx.train.seed)
    student = build_model(student_arch)
    t2 = cfg.temperature**2  # keeps the soft-target gradient scale independent of T (Hinton et al.)

    def kd_loss(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            soft_targets = torch.log_softmax(teacher(x) / cfg.temperature, dim=1)
        kl = nn.functional.kl_div(torch.log_softmax(logits / cfg.temperature, dim=1), soft_targets,
                                  reduction="batchmean", log_target=True)
        return cfg.alpha * t2 * kl + (1 - cfg.alpha) * nn.functional.cross_entropy(logits, y)

    result = fit(student, ctx.splits.train, ctx.splits.val, _train_params(ctx, meta, cfg.epochs), loss_fn=kd_loss)
    info = {"teacher_params": count_params(teacher), "student_params": count_params(student),
            "teacher_val_acc": accuracy(teacher, *ctx.splits.val), "student_val_acc": result.best_val_accuracy,
            "student_arch": student_arch.to_dict()}
    ckpt = save_checkpoint(ctx.out_dir / "student.pt", student, student_arch, {**meta, "distill": info})
    print(f"[compress] distill: student {info['student_params']} params (teacher {info['teacher_params']}), "
          f"val acc {info['student_val_acc']:.4f} (teacher {info['teacher_val_acc']:.4f})")
    return replace(state, checkpoint=ckpt, info={**state.info, "distill": info})


def _preprocessed(state: ModelState, ctx: CompressContext) -> Path:
    """ORT's recommended pre-pass (shape inference + graph cleanup) before quantizing."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = ctx.out_dir / "preprocessed.onnx"
    quant_pre_process(str(state.onnx), str(out))
    return out


def cpu_has_vnni() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


@register("quantize_dynamic", onnx_level=True)
def quantize_dynamic(state: ModelState, cfg: QuantizeDynamic, ctx: CompressContext) -> ModelState:
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    out = ctx.out_dir / "int8_dynamic.onnx"
    ort_quantize_dynamic(str(_preprocessed(state, ctx)), str(out), weight_type=QuantType.QInt8,
                         per_channel=cfg.per_channel)
    return replace(state, onnx=out, parity_max_abs=None,
                   info={**state.info, "quantize_dynamic": {"per_channel": cfg.per_channel}})


class _CalibrationReader:
    """Feeds calibration samples one at a time, as ORT's CalibrationDataReader protocol expects."""

    def __init__(self, x: np.ndarray):
        self._it = iter(x[i : i + 1] for i in range(len(x)))

    def get_next(self) -> dict | None:
        batch = next(self._it, None)
        return None if batch is None else {INPUT_NAME: batch}


@register("quantize_static", onnx_level=True)
def quantize_static(state: ModelState, cfg: QuantizeStatic, ctx: CompressContext) -> ModelState:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    x_train = ctx.splits.train[0]
    if len(x_train) == 0:
        raise ValueError("quantize_static: the calibration set (training split) is empty")
    rng = np.random.default_rng(ctx.train.seed)
    calib = x_train[rng.permutation(len(x_train))[: cfg.calibration_samples]]
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[cfg.calibrate_method]
    reduce_range = not cpu_has_vnni()  # 7-bit weights avoid u8s8 overflow on CPUs without VNNI
    out = ctx.out_dir / "int8_static.onnx"
    ort_quantize_static(str(_preprocessed(state, ctx)), str(out), _CalibrationReader(calib),
                        quant_format=QuantFormat.QDQ, per_channel=cfg.per_channel, reduce_range=reduce_range,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, calibrate_method=method)
    info = {"calibration_samples": len(calib), "calibrate_method": cfg.calibrate_method,
            "per_channel": cfg.per_channel, "reduce_range": reduce_range}
    return replace(state, onnx=out, parity_max_abs=None, info={**state.info, "quantize_static": info})


def _export(state: ModelState, ctx: CompressContext) -> ModelState:
    model, _, _ = load_checkpoint(state.checkpoint)
    result = export_onnx(model, ctx.out_dir / "model.onnx", ctx.splits.test[0])
    return replace(state, onnx=result.path, parity_max_abs=result.parity_max_abs,
                   info={**state.info, "params": count_params(model)})


def compress(checkpoint: Path, recipe: list, ctx: CompressContext) -> ModelState:
    """Apply `recipe` (a list of step configs) to `checkpoint` and return the exported result."""
    state = ModelState(checkpoint=Path(checkpoint))
    for step in recipe:
        handler = HANDLERS.get(step.method)
        if handler is None:
            raise ValueError(f"unknown compression method {step.method!r}; known: {sorted(HANDLERS)}")
        if step.method in ONNX_METHODS and state.onnx is None:
            state = _export(state, ctx)
        state = handler(state, step, ctx)
    return state if state.onnx is not None else _export(state, ctx)


@dataclass(frozen=True)
class Candidate:
    name: str
    onnx: Path
    checkpoint: Path
    parity_max_abs: float | None
    info: dict


def compress_candidate(name: str, recipe: list, baseline: Path, data_dir: Path, train: TrainConfig,
                       out_dir: Path) -> Candidate:
    """One candidate end to end: its recipe on the baseline, written under `out_dir/name`."""
    ctx = CompressContext(load_splits(data_dir), train, Path(baseline), Path(out_dir) / name)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    print(f"[compress] {name}: {' -> '.join(s.method for s in recipe) or 'export only'}")
    state = compress(baseline, copy.deepcopy(recipe), ctx)
    return Candidate(name, state.onnx, state.checkpoint, state.parity_max_abs, state.info)


compress_candidate_task = task(compress_candidate, name="compress_candidate", task_run_name="compress-{name}")
