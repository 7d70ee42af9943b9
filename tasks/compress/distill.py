"""Knowledge distillation into a smaller student."""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from tasks.compress.base import (
    CompressContext,
    ModelState,
    StepConfig,
    register,
    train_params,
)
from tasks.core.settings import Section
from tasks.models import (
    FAMILIES,
    Activation,
    arch_from_params,
    build_model,
    count_params,
    load_checkpoint,
    save_checkpoint,
    vocab_of,
)
from tasks.train.loop import accuracy, fit


class StudentSpec(Section):
    """A built-in distillation student, as the parameters a search trial of its family would pick.
    Bounded: a student is meant to be small, and a typo of a few digits must not allocate gigabytes."""

    family: Literal["mlp", "cnn", "resnet", "text"] = Field(..., description="The student's built-in family.")
    depth: int = Field(
        ...,
        ge=1,
        le=8,
        description="Hidden layers (mlp; text: embedding + depth-1), conv blocks (cnn) or residual stages (resnet).",
    )
    width: int | None = Field(
        None, ge=1, le=4096, description="Hidden units (mlp, the cnn's head, the text embedding); resnet has none."
    )
    channels: int | None = Field(
        None, ge=1, le=512, description="Channels of the first conv block or stage (cnn, resnet), doubling per block."
    )
    activation: Activation = Field("relu", description="Activation function.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout after each hidden layer.")
    kernel: int = Field(3, ge=1, le=15, description="Conv kernel size (odd).")

    @model_validator(mode="after")
    def _fits_family(self) -> StudentSpec:
        problems = []
        if self.family in ("cnn", "resnet") and self.channels is None:
            problems.append(f"a {self.family} student needs channels")
        if self.family != "resnet" and self.width is None:
            problems.append(f"a {self.family} student needs width")
        if self.kernel % 2 == 0:
            problems.append(f"kernel {self.kernel} is not odd")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class Distill(StepConfig):
    method: Literal["distill"]
    width_factor: float = Field(0.5, gt=0, le=1, description="Student width/channels as a share of the teacher's.")
    depth: int | None = Field(
        None,
        ge=1,
        description="Student depth; default the teacher's (a Hugging Face "
        "teacher: half its transformer layers, spread from the first to the last).",
    )
    conv: list[int] | None = Field(
        None, description="Explicit student conv channels (e.g. from a search trial); overrides width_factor."
    )
    hidden: list[int] | None = Field(None, description="Explicit student hidden widths; overrides width_factor.")
    student: StudentSpec | None = Field(
        None,
        description="A built-in student for any teacher (a resnet, your module, "
        "a Hugging Face model), as search parameters: e.g. {family: text, width: 128, "
        "depth: 2} or {family: cnn, channels: 16, depth: 2, width: 64}; overrides the "
        "scaled teacher.",
    )
    temperature: float = Field(4.0, gt=0, description="Softmax temperature of the KL term.")
    alpha: float = Field(0.7, ge=0, le=1, description="Weight of the KL term; 1-alpha weights the hard-label loss.")
    epochs: int = Field(30, ge=1, description="Student training epochs (early stopping applies).")


@register("distill")
def distill(state: ModelState, cfg: Distill, ctx: CompressContext) -> ModelState:
    """Train a smaller student on temperature-scaled KL to the teacher's logits plus hard labels: a
    named built-in student, the teacher's shallower twin (Hugging Face: its layers, with their
    weights), or its narrower twin."""
    teacher, arch, meta = load_checkpoint(state.checkpoint)
    family, student = FAMILIES[arch.family], None
    if cfg.student is not None:
        student_arch = arch_from_params(
            cfg.student.model_dump(exclude_none=True), arch.num_classes, arch.input_shape, vocab_of(ctx.splits.manifest)
        )
    elif family.shallower is not None:
        student, student_arch = family.shallower(teacher, arch, cfg.depth)
    elif not family.scales:
        raise ValueError(
            f"distill: a {arch.family} teacher has no scaled-down twin; name a built-in student "
            "(student: {family: ..., ...})"
        )
    else:
        student_arch = arch.scaled(cfg.width_factor, cfg.depth)
    if cfg.conv is not None or cfg.hidden is not None:
        student_arch = replace(
            student_arch,
            conv=tuple(cfg.conv if cfg.conv is not None else student_arch.conv),
            hidden=tuple(cfg.hidden if cfg.hidden is not None else student_arch.hidden),
        )
    torch.manual_seed(ctx.train.seed)
    if student is None:
        student = build_model(student_arch)
    t2 = cfg.temperature**2  # keeps the soft-target gradient scale independent of T (Hinton et al.)

    def kd_loss(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            soft_targets = torch.log_softmax(teacher(x) / cfg.temperature, dim=1)
        kl = nn.functional.kl_div(
            torch.log_softmax(logits / cfg.temperature, dim=1), soft_targets, reduction="batchmean", log_target=True
        )
        return cfg.alpha * t2 * kl + (1 - cfg.alpha) * nn.functional.cross_entropy(logits, y)

    result = fit(student, ctx.splits.train, ctx.splits.val, train_params(ctx, meta, cfg.epochs), loss_fn=kd_loss)
    info = {
        "teacher_params": count_params(teacher),
        "student_params": count_params(student),
        "teacher_val_acc": accuracy(teacher, *ctx.splits.val),
        "student_val_acc": result.best_val_accuracy,
        "student_arch": student_arch.to_dict(),
    }
    ckpt = save_checkpoint(ctx.out_dir / "student.pt", student, student_arch, {**meta, "distill": info})
    print(
        f"[compress] distill: student {info['student_params']} params (teacher {info['teacher_params']}), "
        f"val acc {info['student_val_acc']:.4f} (teacher {info['teacher_val_acc']:.4f})"
    )
    return replace(state, checkpoint=ckpt, info={**state.info, "distill": info})
