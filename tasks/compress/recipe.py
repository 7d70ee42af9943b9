"""Compression: every method is a config class (tasks.config) plus one handler registered here.

A candidate is a recipe of steps applied to the trained FP32 baseline. Torch steps (pruning,
distillation) produce a checkpoint; ONNX steps (quantization) produce an ONNX file. The model is
exported once, at the first ONNX step or at the end, so parity is always measured against the
PyTorch model that was exported. Adding a method = one config class + one `@register` function.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import CalibrationDataReader
from prefect import task
from torch import nn
from torch.nn.utils import parametrize

from tasks.models import FAMILIES, arch_from_params, build_model, count_params, load_checkpoint, save_checkpoint, vocab_of
from tasks.compress.prune_graph import prune_channels
from tasks.config import (Binarize, ConvertFp16, Distill, MagnitudePrune, QuantizeAware, QuantizeDynamic,
                          QuantizeStatic, SparsityTrain, StructuredPrune, TrainConfig)
from tasks.onnx.export import export_onnx
from tasks.onnx.runtime import graph_feeds, make_session, onnx_accuracy
from tasks.train.stage import TrainParams, accuracy, fit
from tasks.data import Splits, load_splits


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


def registrar(handlers: dict[str, Callable], onnx_methods: set[str]):
    """A `@register(method, onnx_level=...)` decorator filling one pipeline's handler registry."""
    def register(method: str, onnx_level: bool = False) -> Callable[[Callable], Callable]:
        def deco(fn: Callable) -> Callable:
            handlers[method] = fn
            if onnx_level:
                onnx_methods.add(method)
            return fn

        return deco

    return register


register = registrar(HANDLERS, ONNX_METHODS)


def _train_params(ctx: CompressContext, meta: dict, epochs: int, lr_scale: float = 1.0) -> TrainParams:
    """The baseline's own training settings (from its checkpoint), with a new budget and lr scale; a
    compressed model trains whole (its head is not new, so nothing is frozen)."""
    base = {**meta["train"], "lr": meta["train"]["lr"] * lr_scale, "freeze_epochs": 0}
    return TrainParams.from_search(base, epochs, ctx.train.patience, ctx.train.seed)


def _layers(model: nn.Module) -> list[nn.Module]:
    """Conv and Linear layers in forward order (build_model's order: convs, hiddens, classifier)."""
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _prunable(model: nn.Module) -> list[nn.Parameter]:
    return [m.weight for m in _layers(model)]


def _magnitude_masks(weights: list[torch.Tensor], sparsity: float, scope: str) -> list[torch.Tensor]:
    """Keep-masks zeroing the `sparsity` share of smallest |w|, ranked globally or per layer."""
    def threshold(values: torch.Tensor) -> torch.Tensor:
        k = int(sparsity * values.numel())
        return values.kthvalue(k).values if k > 0 else torch.tensor(-1.0)

    if scope == "global":
        t = threshold(torch.cat([w.abs().flatten() for w in weights]))
        return [(w.abs() > t).float() for w in weights]
    return [(w.abs() > threshold(w.abs().flatten())).float() for w in weights]


@register("magnitude_prune")
def magnitude_prune(state: ModelState, cfg: MagnitudePrune, ctx: CompressContext) -> ModelState:
    """Unstructured pruning on an iterative schedule: each step zeroes more of the smallest |w|
    (never reviving earlier zeros) and fine-tunes with the mask re-applied after every update."""
    model, arch, meta = load_checkpoint(state.checkpoint)
    masks: list[torch.Tensor] = []

    def apply_masks(m: nn.Module) -> None:
        with torch.no_grad():
            for w, mask in zip(_prunable(m), masks):
                w.mul_(mask)

    history = []
    for step in range(1, cfg.steps + 1):
        target = cfg.sparsity * step / cfg.steps
        masks = _magnitude_masks([w.detach() for w in _prunable(model)], target, cfg.scope)
        apply_masks(model)
        acc_pruned = accuracy(model, *ctx.splits.val)
        if cfg.finetune_epochs:
            fit(model, ctx.splits.train, ctx.splits.val,
                _train_params(ctx, meta, cfg.finetune_epochs, cfg.finetune_lr_scale), after_step=apply_masks)
        history.append({"sparsity": target, "val_acc_pruned": acc_pruned, "val_acc_finetuned": accuracy(model, *ctx.splits.val)})
        print(f"[compress] magnitude_prune step {step}/{cfg.steps}: sparsity {target:.2f}, val acc "
              f"{acc_pruned:.4f} -> {history[-1]['val_acc_finetuned']:.4f} after {cfg.finetune_epochs} fine-tune epochs")
    zeros = sum(int((w == 0).sum()) for w in _prunable(model))
    total = sum(w.numel() for w in _prunable(model))
    info = {"sparsity": zeros / total, "scope": cfg.scope, "steps": history, "params": count_params(model),
            "nonzero_params": count_params(model) - zeros}
    ckpt = save_checkpoint(ctx.out_dir / "pruned.pt", model, arch, {**meta, "magnitude_prune": info})
    return replace(state, checkpoint=ckpt, info={**state.info, "magnitude_prune": info})


@register("structured_prune")
def structured_prune(state: ModelState, cfg: StructuredPrune, ctx: CompressContext) -> ModelState:
    """Remove whole conv channels / hidden neurons (lowest weight norm) and rebuild physically
    smaller layers, so the exported graph itself shrinks and speeds up; then fine-tune."""
    model, arch, meta = load_checkpoint(state.checkpoint)
    if not FAMILIES[arch.family].rebuilds:
        return _prune_in_place(model, arch, meta, state, cfg, ctx)
    layers = _layers(model)
    keep: list[torch.Tensor] = []
    for layer in layers[:-1]:
        scores = layer.weight.detach().flatten(1).norm(p=cfg.norm, dim=1)
        n_keep = max(1, round(len(scores) * (1 - cfg.amount)))
        keep.append(scores.topk(n_keep).indices.sort().values)
    keep.append(torch.arange(arch.num_classes))  # the classifier keeps every class
    n_conv = len(arch.conv)
    small_arch = replace(arch, conv=tuple(len(k) for k in keep[:n_conv]),
                         hidden=tuple(len(k) for k in keep[n_conv:-1]))
    small = build_model(small_arch)
    prev = torch.arange(arch.input_shape[0])
    with torch.no_grad():
        for i, (old, new, rows) in enumerate(zip(layers, _layers(small), keep)):
            if i == n_conv:  # first Linear after Flatten: each kept channel owns a block of spatial inputs
                channels_in = arch.conv[-1] if n_conv else arch.input_shape[0]
                spatial = old.in_features // channels_in
                cols = (prev[:, None] * spatial + torch.arange(spatial)).flatten()
            else:
                cols = prev
            new.weight.copy_(old.weight[rows][:, cols])
            new.bias.copy_(old.bias[rows])
            prev = rows
    acc_pruned = accuracy(small, *ctx.splits.val)
    if cfg.finetune_epochs:
        fit(small, ctx.splits.train, ctx.splits.val, _train_params(ctx, meta, cfg.finetune_epochs, cfg.finetune_lr_scale))
    info = {"amount": cfg.amount, "params_before": count_params(model), "params_after": count_params(small),
            "arch_after": small_arch.to_dict(), "val_acc_pruned": acc_pruned,
            "val_acc_finetuned": accuracy(small, *ctx.splits.val)}
    ckpt = save_checkpoint(ctx.out_dir / "structured.pt", small, small_arch, {**meta, "structured_prune": info})
    print(f"[compress] structured_prune: conv {arch.conv}->{small_arch.conv} hidden {arch.hidden}->{small_arch.hidden}, "
          f"params {info['params_before']}->{info['params_after']}, val acc {acc_pruned:.4f} -> "
          f"{info['val_acc_finetuned']:.4f} after {cfg.finetune_epochs} fine-tune epochs")
    return replace(state, checkpoint=ckpt, info={**state.info, "structured_prune": info})


def _prune_in_place(model: nn.Module, arch, meta: dict, state: ModelState, cfg: StructuredPrune,
                    ctx: CompressContext) -> ModelState:
    """Families with no narrower `Arch` to rebuild (residual nets, a user's module, text): Torch-Pruning
    removes coupled channel groups in place; the checkpoint records the pruned shapes."""
    example = torch.from_numpy(ctx.splits.val[0][:2])
    info = prune_channels(model, example, cfg.amount, cfg.norm)
    acc_pruned = accuracy(model, *ctx.splits.val)
    if cfg.finetune_epochs:
        fit(model, ctx.splits.train, ctx.splits.val, _train_params(ctx, meta, cfg.finetune_epochs, cfg.finetune_lr_scale))
    info = {"amount": cfg.amount, **info, "val_acc_pruned": acc_pruned, "val_acc_finetuned": accuracy(model, *ctx.splits.val)}
    ckpt = save_checkpoint(ctx.out_dir / "structured.pt", model, arch, {**meta, "structured_prune": info})
    print(f"[compress] structured_prune ({arch.family}, dependency graph): params {info['params_before']}->"
          f"{info['params_after']}, val acc {acc_pruned:.4f} -> {info['val_acc_finetuned']:.4f} after "
          f"{cfg.finetune_epochs} fine-tune epochs")
    return replace(state, checkpoint=ckpt, info={**state.info, "structured_prune": info})


@register("distill")
def distill(state: ModelState, cfg: Distill, ctx: CompressContext) -> ModelState:
    """Train a smaller student on temperature-scaled KL to the teacher's logits plus hard labels: a
    named built-in student, the teacher's shallower twin (Hugging Face: its layers, with their
    weights), or its narrower twin."""
    teacher, arch, meta = load_checkpoint(state.checkpoint)
    family, student = FAMILIES[arch.family], None
    if cfg.student is not None:
        student_arch = arch_from_params(cfg.student.model_dump(exclude_none=True), arch.num_classes, arch.input_shape,
                                        vocab_of(ctx.splits.manifest))
    elif family.shallower is not None:
        student, student_arch = family.shallower(teacher, arch, cfg.depth)
    elif not family.scales:
        raise ValueError(f"distill: a {arch.family} teacher has no scaled-down twin; name a built-in student "
                         "(student: {family: ..., ...})")
    else:
        student_arch = arch.scaled(cfg.width_factor, cfg.depth)
    if cfg.conv is not None or cfg.hidden is not None:
        student_arch = replace(student_arch, conv=tuple(cfg.conv if cfg.conv is not None else student_arch.conv),
                               hidden=tuple(cfg.hidden if cfg.hidden is not None else student_arch.hidden))
    torch.manual_seed(ctx.train.seed)
    if student is None:
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


@contextmanager
def _weights_seen_through(layers: list[nn.Module], make: Callable[[], nn.Module]) -> Iterator[None]:
    """Inside, every layer's weight is seen through a fresh `make()` parametrization (training updates
    the latent weight); on leaving, the parametrized value is baked into the plain weight."""
    for layer in layers:
        parametrize.register_parametrization(layer, "weight", make())
    yield
    for layer in layers:
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)


class _BinaryWeight(nn.Module):
    """Parametrization: sign(w) x alpha, alpha the mean |w| of each output channel (XNOR-Net's
    optimal scale). The backward pass is the identity on w (straight-through estimator), so the
    latent full-precision weights keep learning while every forward pass sees binary ones."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        alpha = w.detach().abs().flatten(1).mean(1).view(-1, *[1] * (w.dim() - 1))
        return w + (torch.where(w >= 0, alpha, -alpha) - w).detach()


@register("binarize")
def binarize(state: ModelState, cfg: Binarize, ctx: CompressContext) -> ModelState:
    """1-bit weights with a per-channel scale, trained with a straight-through estimator, then baked
    in. ONNX Runtime has no 1-bit kernels: the exported graph stores the +-alpha values as float32
    and runs at float speed; `info` states the size the weights would take packed to one bit."""
    model, arch, meta = load_checkpoint(state.checkpoint)
    layers = _layers(model)
    chosen = layers[1:-1] if cfg.keep_first_last else layers
    if not chosen:
        raise ValueError(f"binarize: the model has {len(layers)} conv/linear layers; with keep_first_last nothing "
                         "is left to binarize")
    with _weights_seen_through(chosen, _BinaryWeight):
        acc_binary = accuracy(model, *ctx.splits.val)
        fit(model, ctx.splits.train, ctx.splits.val,
            _train_params(ctx, meta, cfg.finetune_epochs, cfg.finetune_lr_scale))
    binary = sum(layer.weight.numel() for layer in chosen)
    scales = sum(layer.weight.shape[0] for layer in chosen)
    bits = binary + 32 * (scales + count_params(model) - binary)
    info = {"layers_binarized": len(chosen), "binary_weights": binary, "params": count_params(model),
            "packed_bits": bits, "packed_bytes": -(-bits // 8), "float32_bytes": 4 * count_params(model),
            "val_acc_binarized": acc_binary, "val_acc_trained": accuracy(model, *ctx.splits.val)}
    ckpt = save_checkpoint(ctx.out_dir / "binary.pt", model, arch, {**meta, "binarize": info})
    print(f"[compress] binarize: {binary} of {count_params(model)} weights in {len(chosen)} layers are 1-bit "
          f"({info['packed_bytes']} bytes packed vs {info['float32_bytes']} float32; ORT stores and runs them as "
          f"float32), val acc {acc_binary:.4f} -> {info['val_acc_trained']:.4f} after {cfg.finetune_epochs} epochs")
    return replace(state, checkpoint=ckpt, info={**state.info, "binarize": info})


def _channel_norms(model: nn.Module) -> list[torch.Tensor]:
    """L2 norm of every conv filter / hidden neuron (the classifier's rows are classes, not channels)."""
    return [layer.weight.flatten(1).norm(dim=1) for layer in _layers(model)[:-1]]


@register("sparsity_train")
def sparsity_train(state: ModelState, cfg: SparsityTrain, ctx: CompressContext) -> ModelState:
    """Fine-tune with an L1 penalty: on channel norms (group lasso, driving whole filters/neurons
    towards zero, so a following structured_prune removes channels that carry little) or on the
    weights themselves (ahead of magnitude_prune). The last epoch is kept: the penalty's effect
    builds up over the run."""
    model, arch, meta = load_checkpoint(state.checkpoint)
    if cfg.target == "channels":
        l1 = lambda: sum(n.sum() for n in _channel_norms(model))
    else:
        l1 = lambda: sum(w.abs().sum() for w in _prunable(model))

    def penalised(logits: torch.Tensor, _x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits, y) + cfg.penalty * l1()

    acc_before = accuracy(model, *ctx.splits.val)
    fit(model, ctx.splits.train, ctx.splits.val, _train_params(ctx, meta, cfg.finetune_epochs, cfg.finetune_lr_scale),
        loss_fn=penalised, restore_best=False)
    with torch.no_grad():
        norms = torch.cat(_channel_norms(model))
        weights = torch.cat([w.abs().flatten() for w in _prunable(model)])
    info = {"target": cfg.target, "penalty": cfg.penalty, "val_acc_before": acc_before,
            "val_acc_after": accuracy(model, *ctx.splits.val),
            # "near zero": under 5% of the largest channel norm / weight
            "channels_near_zero": float((norms < 0.05 * norms.max()).float().mean()),
            "weights_near_zero": float((weights < 0.05 * weights.max()).float().mean())}
    ckpt = save_checkpoint(ctx.out_dir / "sparse.pt", model, arch, {**meta, "sparsity_train": info})
    print(f"[compress] sparsity_train ({cfg.target}, penalty {cfg.penalty}): {info['channels_near_zero']:.0%} of "
          f"channels and {info['weights_near_zero']:.0%} of weights near zero, val acc {acc_before:.4f} -> "
          f"{info['val_acc_after']:.4f}")
    return replace(state, checkpoint=ckpt, info={**state.info, "sparsity_train": info})


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
    state = {"lo": None, "hi": None}

    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        lo, hi = float(x.detach().min()), float(x.detach().max())
        if state["lo"] is None:
            state["lo"], state["hi"] = lo, hi
        elif module.training:
            state["lo"] += momentum * (lo - state["lo"])
            state["hi"] += momentum * (hi - state["hi"])
        lo, hi = min(state["lo"], 0.0), max(state["hi"], 0.0)
        scale = max(hi - lo, 1e-8) / 255
        zero = int(round(-128 - lo / scale))
        return (torch.fake_quantize_per_tensor_affine(x, scale, zero, -128, 127), *args[1:])

    return layer.register_forward_pre_hook(hook)


@register("quantize_aware", onnx_level=True)
def quantize_aware(state: ModelState, cfg: QuantizeAware, ctx: CompressContext) -> ModelState:
    """Quantization-aware training: fine-tune with every conv/linear weight on the int8 grid and every
    such layer's input fake-quantized, so the network learns to live with INT8 rounding; then bake
    the weights, export, and convert to QDQ INT8 with ORT's static quantizer (calibrated as
    quantize_static). For when post-training quantization loses too much accuracy."""
    model, arch, meta = load_checkpoint(state.checkpoint)
    layers = _layers(model)
    with _weights_seen_through(layers, lambda: _FakeQuantWeight(cfg.per_channel)):
        hooks = [_fake_quant_inputs(layer) for layer in layers]
        acc_fq = accuracy(model, *ctx.splits.val)
        fit(model, ctx.splits.train, ctx.splits.val,
            _train_params(ctx, meta, cfg.finetune_epochs, cfg.finetune_lr_scale))
        acc_trained = accuracy(model, *ctx.splits.val)
        for hook in hooks:
            hook.remove()
    ckpt = save_checkpoint(ctx.out_dir / "qat.pt", model, arch, {**meta, "quantize_aware": {}})
    exported = _export(replace(state, checkpoint=ckpt), ctx)
    out = _quantize_qdq(_preprocessed(exported, ctx), ctx.out_dir / "int8_qat.onnx",
                        _calibration_set(ctx, cfg.calibration_samples, "quantize_aware"), cfg.per_channel)
    info = {"val_acc_fake_quant_before": acc_fq, "val_acc_fake_quant_trained": acc_trained,
            "val_acc_int8": onnx_accuracy(make_session(out), *ctx.splits.val), "per_channel": cfg.per_channel}
    print(f"[compress] quantize_aware: fake-quant val acc {acc_fq:.4f} -> {acc_trained:.4f} after "
          f"{cfg.finetune_epochs} epochs; exported INT8 val acc {info['val_acc_int8']:.4f}")
    return replace(exported, onnx=out, parity_max_abs=None, info={**exported.info, "quantize_aware": info})


def _preprocessed(state: ModelState, ctx: CompressContext) -> Path:
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


@register("quantize_dynamic", onnx_level=True)
def quantize_dynamic(state: ModelState, cfg: QuantizeDynamic, ctx: CompressContext) -> ModelState:
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    out = ctx.out_dir / "int8_dynamic.onnx"
    ort_quantize_dynamic(str(_preprocessed(state, ctx)), str(out), weight_type=QuantType.QInt8,
                         per_channel=cfg.per_channel)
    return replace(state, onnx=out, parity_max_abs=None,
                   info={**state.info, "quantize_dynamic": {"per_channel": cfg.per_channel}})


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


def _calibration_set(ctx: CompressContext, samples: int, method: str) -> np.ndarray:
    x_train = ctx.splits.train[0]
    if len(x_train) == 0:
        raise ValueError(f"{method}: the calibration set (training split) is empty")
    rng = np.random.default_rng(ctx.train.seed)
    return x_train[rng.permutation(len(x_train))[:samples]]


def _quantize_qdq(fp32: Path, out: Path, calib: np.ndarray, per_channel: bool, calibrate_method: str = "minmax",
                  exclude: list[str] | tuple = ()) -> Path:
    """ORT static INT8 in QDQ format, calibrated on `calib`: signed 8-bit weights, unsigned 8-bit
    activations. ORT's CPU kernels take U8S8 whole: on the residual CNN every Conv and Add became
    QLinearConv/QLinearAdd, where with signed activations 6 of 9 Convs stayed FP32 between
    DequantizeLinear and QuantizeLinear."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[calibrate_method]
    # reduce_range: 7-bit weights avoid u8s8 overflow on CPUs without VNNI.
    ort_quantize_static(str(fp32), str(out), _CalibrationReader(calib, fp32), quant_format=QuantFormat.QDQ,
                        per_channel=per_channel, reduce_range=not cpu_has_vnni(), nodes_to_exclude=list(exclude),
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=method)
    return out


def rank_nodes_by_error(fp32: Path, int8: Path, x: np.ndarray, work: Path) -> list[tuple[str, float]]:
    """(node name, dB of SQNR lost across the node) for every Conv/Gemm/MatMul, worst first.

    SQNR compares a tensor in the INT8 model with the same tensor in the FP32 model on `x`. The
    drop from a node's input to its output is the error that node itself adds, so a late layer is
    not blamed for noise it merely inherited. ORT fuses Conv+Relu in QDQ graphs, so a node's output
    is observed at the first tensor down its single-consumer chain that both models expose.
    """
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations, compute_activation_error, create_activation_matching,
        modify_model_output_intermediate_tensors)

    fp32_aug, int8_aug = work / "fp32_debug.onnx", work / "int8_debug.onnx"
    modify_model_output_intermediate_tensors(str(fp32), str(fp32_aug))
    modify_model_output_intermediate_tensors(str(int8), str(int8_aug))
    matching = create_activation_matching(collect_activations(str(int8_aug), _CalibrationReader(x, fp32)),
                                          collect_activations(str(fp32_aug), _CalibrationReader(x, fp32)))
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


@register("quantize_static", onnx_level=True)
def quantize_static(state: ModelState, cfg: QuantizeStatic, ctx: CompressContext) -> ModelState:
    """QDQ INT8 with calibration. With `max_accuracy_loss`, nodes whose INT8 output strays most from
    FP32 fall back to FP32 one at a time until the val-accuracy loss is within bounds; the best
    model seen is kept even if the bound is never met."""
    calib = _calibration_set(ctx, cfg.calibration_samples, "quantize_static")
    reduce_range = not cpu_has_vnni()
    fp32 = _preprocessed(state, ctx)

    def quantize(exclude: list[str], out: Path) -> float:
        _quantize_qdq(fp32, out, calib, cfg.per_channel, cfg.calibrate_method, exclude)
        return onnx_accuracy(make_session(out), *ctx.splits.val)

    out = ctx.out_dir / "int8_static.onnx"
    acc = quantize([], out)
    fp32_acc = onnx_accuracy(make_session(fp32), *ctx.splits.val)
    info = {"calibration_samples": len(calib), "calibrate_method": cfg.calibrate_method,
            "per_channel": cfg.per_channel, "reduce_range": reduce_range, "val_acc_fp32": fp32_acc,
            "val_acc_int8_full": acc, "nodes_excluded": []}
    loss = lambda a: (fp32_acc - a) * 100
    if cfg.max_accuracy_loss is not None and loss(acc) > cfg.max_accuracy_loss:
        ranking = rank_nodes_by_error(fp32, out, calib[:64], ctx.out_dir)
        info["node_sqnr_loss_db"] = dict(ranking)
        best_acc, best_excluded, excluded = acc, [], []
        for node, sqnr in ranking[: cfg.max_fallback_nodes]:
            excluded.append(node)
            trial = ctx.out_dir / f"int8_fallback_{len(excluded)}.onnx"
            trial_acc = quantize(list(excluded), trial)
            print(f"[compress] quantize_static: FP32 fallback of {node} (loses {sqnr:.1f} dB SQNR): val acc {trial_acc:.4f} "
                  f"(loss {loss(trial_acc):.2f} pts, allowed {cfg.max_accuracy_loss:.2f})")
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


@register("convert_fp16", onnx_level=True)
def convert_fp16(state: ModelState, cfg: ConvertFp16, ctx: CompressContext) -> ModelState:
    """Half-precision weights and compute; float32 I/O kept by default so callers need no change."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    out = ctx.out_dir / "fp16.onnx"
    model = OnnxModel(convert_float_to_float16(onnx.load(str(state.onnx)), keep_io_types=cfg.keep_io_types))
    model.topological_sort()  # the converter appends its I/O Casts last, which onnx.checker rejects
    onnx.checker.check_model(model.model)
    onnx.save(model.model, str(out))
    return replace(state, onnx=out, parity_max_abs=None,
                   info={**state.info, "convert_fp16": {"keep_io_types": cfg.keep_io_types}})


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
