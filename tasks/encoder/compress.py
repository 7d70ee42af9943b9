"""Sentence-encoder candidates: the FP32 teacher export, and recipes applied to it.

Same shape as tasks.compress.recipe: every method is a config class (tasks.config) plus one handler
registered here. The torch step (layer distillation) exports its student; ONNX steps (graph
optimisation, dynamic INT8) start from the teacher's export or the student's.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import torch
from prefect import task
from pydantic import Field

from tasks.compress.base import Candidate, ModelState, Recipes, StepConfig, registrar
from tasks.compress.quantize_dynamic import QuantizeDynamic
from tasks.core.fingerprint import code_version
from tasks.data.docstrings import load_sentences
from tasks.encoder.minilm import (
    EncoderConfig,
    distill_encoder,
    export_encoder,
    load_minilm,
    make_student,
    optimize_encoder,
    quantize_encoder,
)


class DistillLayers(StepConfig):
    method: Literal["distill_layers"]
    keep: list[int] = Field(
        [0, 2, 5],
        min_length=1,
        description="Teacher layers the student starts from (its depth); "
        "keeping the last one keeps the embedding space (measured: far better than 0, 2, 4).",
    )
    epochs: int = Field(8, ge=1, description="Passes over the training sentences.")
    lr: float = Field(3e-4, gt=0, description="Peak AdamW learning rate (linear warm-up, cosine decay).")
    batch: int = Field(32, ge=1, description="Sentences per step.")


class OrtOptimize(StepConfig):
    on_onnx: ClassVar[bool] = True
    method: Literal["ort_optimize"]
    opt_level: Literal[0, 1, 2, 99] = Field(
        1, description="ONNX Runtime graph-optimisation level applied before the transformer fusions (1 = basic)."
    )


EncoderStep = Annotated[DistillLayers | OrtOptimize | QuantizeDynamic, Field(discriminator="method")]


def _default_encoder_candidates() -> dict[str, list]:
    student = DistillLayers(method="distill_layers")
    int8 = QuantizeDynamic(method="quantize_dynamic", per_channel=True)
    return {
        "optimized": [OrtOptimize(method="ort_optimize")],
        "int8": [OrtOptimize(method="ort_optimize"), int8],
        "student": [student],
        "student_int8": [student, OrtOptimize(method="ort_optimize"), int8],
    }


class EncoderCompressConfig(Recipes):
    candidates: dict[str, list[EncoderStep]] = Field(
        default_factory=_default_encoder_candidates,
        description="Candidate name -> recipe: steps applied in order to the exported FP32 teacher.",
    )


class ExportError(RuntimeError):
    """An exported encoder disagrees with PyTorch."""


@dataclass(frozen=True)
class EncoderContext:
    encoder: EncoderConfig
    data_dir: Path
    data_version: str
    out_dir: Path  # this candidate's folder
    cache_dir: Path  # distilled students, keyed by everything that determines them


Handler = Callable[[ModelState, object, EncoderContext], ModelState]
HANDLERS: dict[str, Handler] = {}
register = registrar(HANDLERS)


def _export_checked(model, tokenizer, path: Path, encoder: EncoderConfig, data_dir: Path) -> ModelState:
    """Export and refuse a graph whose embeddings drift from PyTorch's on held-out sentences."""
    exported = export_encoder(model, tokenizer, path, load_sentences(data_dir).eval[:32])
    if exported.min_cosine < encoder.min_export_cosine:
        raise ExportError(
            f"{path.name}: worst cosine ORT vs PyTorch {exported.min_cosine:.6f} < "
            f"{encoder.min_export_cosine} (encoder.min_export_cosine)"
        )
    params = sum(p.numel() for p in model.parameters())
    print(
        f"[compress] exported {path.name}: {params / 1e6:.1f}M parameters, worst cosine vs PyTorch "
        f"{exported.min_cosine:.7f}, max |diff| {exported.max_abs:.1e}"
    )
    return ModelState(
        checkpoint=path,
        onnx=exported.path,
        parity_max_abs=exported.max_abs,
        info={"params": params, "export_min_cosine": exported.min_cosine},
    )


@register("distill_layers")
def distill_layers(state: ModelState, cfg: DistillLayers, ctx: EncoderContext) -> ModelState:
    """A shallower student initialised from the teacher layers `cfg.keep`, trained to reproduce the
    teacher's embeddings on the training sentences. The trained weights are cached by data version,
    teacher, step config and code, so recipes sharing a student (student, student_int8) train it once."""
    teacher, tokenizer = load_minilm(ctx.encoder.num_layers)
    key = hashlib.sha256(
        json.dumps(
            [
                ctx.data_version,
                ctx.encoder.num_layers,
                ctx.encoder.max_length,
                cfg.model_dump(mode="json"),
                code_version(),
            ]
        ).encode()
    ).hexdigest()[:16]
    weights = ctx.cache_dir / f"student-{key}.pt"
    reused = weights.exists()
    if reused:
        saved = torch.load(weights, map_location="cpu", weights_only=True)
        student = make_student(teacher, tuple(cfg.keep))
        student.load_state_dict(saved["state_dict"])
        print(f"[compress] distill_layers: reusing the student trained in this configuration ({weights.name})")
    else:
        student, history = distill_encoder(
            teacher,
            tokenizer,
            load_sentences(ctx.data_dir).train,
            tuple(cfg.keep),
            cfg.epochs,
            cfg.lr,
            cfg.batch,
            max_length=ctx.encoder.max_length,
        )
        saved = {"state_dict": student.state_dict(), "loss_history": history}
        weights.parent.mkdir(parents=True, exist_ok=True)
        tmp = weights.with_suffix(".tmp")
        torch.save(saved, tmp)
        tmp.replace(weights)  # a run killed mid-save leaves no half-written cache entry
    exported = _export_checked(student.eval(), tokenizer, ctx.out_dir / "student.onnx", ctx.encoder, ctx.data_dir)
    info = {
        **cfg.model_dump(exclude={"method"}),
        "loss_history": saved["loss_history"],
        "reused": reused,
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
    }
    return replace(exported, checkpoint=weights, info={**state.info, **exported.info, "distill_layers": info})


@register("ort_optimize")
def ort_optimize(state: ModelState, cfg: OrtOptimize, ctx: EncoderContext) -> ModelState:
    out = ctx.out_dir / "optimized.onnx"
    assert state.onnx is not None  # the encoder's recipes start from the exported teacher
    fused = optimize_encoder(state.onnx, out, opt_level=cfg.opt_level)
    print(f"[compress] ort_optimize: fused {fused}")
    return replace(state, onnx=out, parity_max_abs=None, info={**state.info, "ort_optimize": {"fused": fused}})


@register("quantize_dynamic")
def quantize_dynamic(state: ModelState, cfg: QuantizeDynamic, ctx: EncoderContext) -> ModelState:
    assert state.onnx is not None  # the encoder's recipes start from the exported teacher
    out = quantize_encoder(state.onnx, ctx.out_dir / "int8_dynamic.onnx", per_channel=cfg.per_channel)
    return replace(
        state, onnx=out, parity_max_abs=None, info={**state.info, "quantize_dynamic": {"per_channel": cfg.per_channel}}
    )


def export_teacher(encoder: EncoderConfig, data_dir: Path, out_dir: Path) -> tuple[Candidate, Path]:
    """The FP32 baseline: packaged MiniLM (optionally truncated) exported and checked against
    PyTorch; also saves the tokenizer the bundle ships with. Returns (candidate, tokenizer dir)."""
    model, tokenizer = load_minilm(encoder.num_layers)
    state = _export_checked(model, tokenizer, Path(out_dir) / "baseline" / "model.onnx", encoder, Path(data_dir))
    tokenizer_dir = Path(out_dir) / "tokenizer"
    tokenizer.save_pretrained(str(tokenizer_dir))
    assert state.onnx is not None  # just exported
    return Candidate("baseline", state.onnx, state.checkpoint, state.parity_max_abs, state.info), tokenizer_dir


def compress_encoder(
    name: str,
    recipe: list,
    teacher: Candidate,
    encoder: EncoderConfig,
    data_dir: Path,
    data_version: str,
    out_dir: Path,
    cache_dir: Path,
) -> Candidate:
    """One candidate: its recipe applied to the exported teacher, written under `out_dir/name`."""
    ctx = EncoderContext(encoder, Path(data_dir), data_version, Path(out_dir) / name, Path(cache_dir))
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    print(f"[compress] {name}: {' -> '.join(s.method for s in recipe)}")
    state = ModelState(
        checkpoint=teacher.checkpoint, onnx=teacher.onnx, parity_max_abs=teacher.parity_max_abs, info=dict(teacher.info)
    )
    for step in recipe:
        handler = HANDLERS.get(step.method)
        if handler is None:
            raise ValueError(f"unknown encoder compression method {step.method!r}; known: {sorted(HANDLERS)}")
        state = handler(state, step, ctx)
    assert state.onnx is not None  # every encoder step keeps an ONNX file
    return Candidate(name, state.onnx, state.checkpoint, state.parity_max_abs, state.info)


export_teacher_task = task(name="export_teacher")(export_teacher)
compress_encoder_task = task(name="compress_encoder", task_run_name="compress-{name}")(compress_encoder)
