"""Pipeline configuration: one model per concern, every field defaulted and documented.

`load_config` validates the whole file at once and raises a single `ConfigError` listing every
problem, so a user fixes a config in one pass instead of one error per run.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import math
import os
import re
import typing
from pathlib import Path
from typing import Annotated, ClassVar, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

from tasks.lm.finetune import FinetuneConfig


class ConfigError(ValueError):
    """The configuration file is missing, unreadable or invalid; the message lists every problem."""


class _Section(BaseModel):
    # A misspelt key must be an error, not a silently ignored default.
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    dataset: Literal["digits"] = Field("digits", description="Built-in data set written to `dir` when it is absent.")
    dir: Path = Field(Path("data"), description="DVC-tracked data folder (relative to the project root).")
    val_fraction: float = Field(0.15, gt=0, lt=0.5, description="Share of samples held out for validation.")
    test_fraction: float = Field(0.2, gt=0, lt=0.5, description="Share of samples held out for the final test.")
    split_seed: int = Field(0, description="Seed of the stratified train/val/test split.")
    dvc_remote: str = Field(".modelforge/dvc-remote", description="DVC remote the data is pushed to: a folder "
                            "(relative to the project, or a path every worker mounts) or a URL (s3://bucket/path).")


class TableDataConfig(_Section):
    """A user's table (CSV, Parquet or JSONL) in `dir`: one row per sample, one label column."""

    dataset: Literal["table"]
    dir: Path = Field(Path("data"), description="DVC-tracked folder holding the table file (relative to the project root).")
    file: str | None = Field(None, description="The table's file name in `dir`; default: the one .csv/.parquet/.jsonl there.")
    label: str = Field(..., min_length=1, description="The column holding each row's class.")
    id_column: str | None = Field(None, description="A unique id per row to split by; default: the row's content.")
    categorical: list[str] = Field([], description="Numeric-looking columns to treat as categories (text columns always are).")
    drop: list[str] = Field([], description="Columns to ignore (free text, timestamps, leaks of the label).")
    val_fraction: float = Field(0.15, gt=0, lt=0.5, description="Share of rows held out for validation (by hash).")
    test_fraction: float = Field(0.2, gt=0, lt=0.5, description="Share of rows held out for the final test (by hash).")
    min_class_samples: int = Field(5, ge=1, description="Fewest train rows a class may have.")
    allow_drift: bool = Field(False, description="Accept a new/missing column, a changed type or a new label "
                              "against the previously versioned data (an error by default).")
    dvc_remote: str = Field(".modelforge/dvc-remote", description="DVC remote the data is pushed to (a folder or a URL).")


class ImageFolderConfig(_Section):
    """A user's images in `dir`: one sub-folder per class of PNG/JPEG files."""

    dataset: Literal["image_folder"]
    dir: Path = Field(Path("data"), description="DVC-tracked folder of class sub-folders (relative to the project root).")
    image_size: tuple[int, int] = Field((32, 32), description="Height and width every image is resized to.")
    color: Literal["gray", "rgb"] = Field("gray", description="Images are converted to 1 (gray) or 3 (rgb) channels.")
    val_fraction: float = Field(0.15, gt=0, lt=0.5, description="Share of images held out for validation (by hash).")
    test_fraction: float = Field(0.2, gt=0, lt=0.5, description="Share of images held out for the final test (by hash).")
    min_class_samples: int = Field(5, ge=1, description="Fewest train images a class may have.")
    allow_drift: bool = Field(False, description="Accept a class folder the previously versioned data did not have.")
    max_image_pixels: int | None = Field(None, ge=1, description="Largest image (width x height, read from its header "
                                         "before decoding) in the folder or in a served request; default 64 x "
                                         "image_size's area, at least 1024 x 1024.")
    max_request_pixels: int | None = Field(None, ge=1, description="Most pixels the images of one served request may "
                                           "hold together (headers summed before any is decoded); default 16 x "
                                           "max_image_pixels.")
    dvc_remote: str = Field(".modelforge/dvc-remote", description="DVC remote the data is pushed to (a folder or a URL).")

    @model_validator(mode="after")
    def _size_positive(self) -> "ImageFolderConfig":
        if min(self.image_size) < 4:
            raise ValueError(f"image_size {list(self.image_size)}: both sides must be at least 4 pixels")
        return self


class TextTableConfig(_Section):
    """A user's labelled text: a CSV or JSONL file in `dir` with a text column and a label column."""

    dataset: Literal["text"]
    dir: Path = Field(Path("data"), description="DVC-tracked folder holding the file (relative to the project root).")
    file: str | None = Field(None, description="The file's name in `dir`; default: the one .csv/.jsonl/.parquet there.")
    text: str = Field("text", min_length=1, description="The column holding each sample's text.")
    label: str = Field("label", min_length=1, description="The column holding each sample's class.")
    max_length: int = Field(64, ge=4, le=1024, description="Tokens kept per text (the rest is cut off).")
    tokenizer: str | None = Field(None, description="None: words, with a vocabulary built on train (the text family). "
                                  "'minilm' or a Hugging Face folder: that checkpoint's tokenizer (for model.pretrained).")
    vocab_size: int = Field(5000, ge=10, description="Most frequent train words kept; the others read as 'unknown'.")
    min_count: int = Field(2, ge=1, description="A word enters the vocabulary only if train holds it this often.")
    val_fraction: float = Field(0.15, gt=0, lt=0.5, description="Share of rows held out for validation (by hash).")
    test_fraction: float = Field(0.2, gt=0, lt=0.5, description="Share of rows held out for the final test (by hash).")
    min_class_samples: int = Field(5, ge=1, description="Fewest train rows a class may have.")
    allow_drift: bool = Field(False, description="Accept a label the previously versioned data did not have.")
    dvc_remote: str = Field(".modelforge/dvc-remote", description="DVC remote the data is pushed to (a folder or a URL).")


def _dataset_of(value: object) -> str | None:
    # A data section that names no dataset is the built-in example, as before sources existed.
    return value.get("dataset", "digits") if isinstance(value, dict) else getattr(value, "dataset", None)


ClassifierData = Annotated[Union[Annotated[DataConfig, Tag("digits")], Annotated[TableDataConfig, Tag("table")],
                                 Annotated[ImageFolderConfig, Tag("image_folder")],
                                 Annotated[TextTableConfig, Tag("text")]], Discriminator(_dataset_of)]


class TextDataConfig(_Section):
    dataset: Literal["docstrings"] = Field(
        "docstrings", description="English sentences from the Python standard library's docstrings (read offline with ast).")
    dir: Path = Field(Path("corpus"), description="DVC-tracked corpus folder (relative to the project root).")
    train_sentences: int = Field(4000, ge=8, description="Sentences for distillation (never used for evaluation).")
    eval_sentences: int = Field(600, ge=12, description="Held-out sentences for fidelity and retrieval checks.")
    queries: int = Field(100, ge=1, description="Held-out sentences used as retrieval queries against the rest.")
    seed: int = Field(0, description="Seed of the sentence shuffle before the split.")
    dvc_remote: str = Field(".modelforge/dvc-remote", description="DVC remote the corpus is pushed to (a folder or a URL).")

    @model_validator(mode="after")
    def _queries_fit(self) -> "TextDataConfig":
        if self.queries > self.eval_sentences - 10:
            raise ValueError(f"queries ({self.queries}) must leave at least 10 of the {self.eval_sentences} "
                             "eval_sentences to search (top-10 retrieval)")
        return self


Optimizer = Literal["sgd", "momentum", "adam", "adamw"]
Schedule = Literal["constant", "cosine", "step"]
Activation = Literal["relu", "gelu", "silu", "tanh"]


class ModelConfig(_Section):
    """A user's own PyTorch module instead of the built-in families; the search then tunes its training."""

    spec: str | None = Field(None, description="'package.module:function': function(num_classes, input_shape) "
                             "returns an nn.Module mapping a float batch to [batch, num_classes] logits. Imported "
                             "from the project folder or an installed package.")
    weights: Path | None = Field(None, description="Pretrained weights for spec: a state_dict saved with torch.save, "
                                 "or .safetensors (never a pickled model); every trial and the final training start "
                                 "from them.")
    pretrained: str | None = Field(None, description="Fine-tune a Hugging Face classifier instead: for texts 'minilm' "
                                   "(the packaged all-MiniLM-L6-v2) or a local folder with config.json, weights and "
                                   "tokenizer.json (data.tokenizer names it too); for an image folder a local image "
                                   "classifier's folder (config.json and weights, e.g. a ViT at data.image_size).")

    @model_validator(mode="after")
    def _spec_valid(self) -> "ModelConfig":
        problems = []
        if self.spec is not None and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", self.spec):
            problems.append(f"spec {self.spec!r} is not 'package.module:function'")
        if self.weights is not None and self.spec is None:
            problems.append("weights need a spec (the module they belong to)")
        if self.spec is not None and self.pretrained is not None:
            problems.append("spec and pretrained name two different models; set one")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def family(self) -> str | None:
        """The model family the section names (custom, hf); None: the search picks a built-in one."""
        return "custom" if self.spec else "hf" if self.pretrained else None

    def fixed_params(self) -> dict:
        """What rebuilds the named model beside the searched settings; every trial carries it."""
        if self.spec:
            return {"spec": self.spec, "weights": str(self.weights or "")}
        return {"pretrained": self.pretrained} if self.pretrained else {}


class SearchSpace(_Section):
    families: list[Literal["mlp", "cnn", "resnet", "text", "custom", "hf"]] = Field(
        ["cnn", "mlp"], min_length=1, description="Model families to search over (resnet: residual CNN with "
        "BatchNorm; text: 4 bags of word embeddings, each then an MLP, logits averaged; custom: the model section's "
        "own module; hf: its pretrained Hugging Face checkpoint).")
    lr: tuple[float, float] = Field((1e-3, 3e-2), description="Log-uniform learning-rate range.")
    weight_decay: list[float] = Field([0.0, 1e-4], min_length=1, description="L2 penalties to try.")
    batch_sizes: list[int] = Field([32, 64], min_length=1, description="Mini-batch sizes to try.")
    optimizers: list[Optimizer] = Field(["sgd", "momentum", "adam", "adamw"], min_length=1,
                                        description="sgd (plain), momentum (SGD+Nesterov 0.9), adam, adamw.")
    schedules: list[Schedule] = Field(["cosine", "constant"], min_length=1, description="Learning-rate schedules.")
    depth: tuple[int, int] = Field((1, 3), description="Hidden layers (mlp), conv blocks (cnn) or residual stages "
                                   "(resnet), inclusive range.")
    width: tuple[int, int] = Field((32, 128), description="Hidden units per layer (log-uniform), inclusive range.")
    activations: list[Activation] = Field(["relu", "gelu"], min_length=1, description="Activation functions.")
    dropout: tuple[float, float] = Field((0.0, 0.3), description="Dropout after each hidden layer, range.")
    channels: tuple[int, int] = Field((8, 32), description="Channels of the first conv block (doubling per block).")
    kernels: list[int] = Field([3], min_length=1, description="Conv kernel sizes (odd).")
    freeze_epochs: tuple[int, int] = Field((0, 0), description="Fine-tuning: epochs that train the new head only, "
                                           "the pretrained backbone frozen, before everything trains; inclusive range.")
    backbone_lr_scale: tuple[float, float] = Field((1.0, 1.0), description="Fine-tuning: the backbone's lr as a "
                                                   "multiple of the head's (log-uniform range; 1 = one lr for all).")
    augment: list[Literal["none", "shift"]] = Field(["shift"], min_length=1, description="Training-time augmentation "
                                                    "to try: shift moves each image by up to 1 px (images only; tables "
                                                    "and other vectors are never augmented).")

    @model_validator(mode="after")
    def _space_valid(self) -> "SearchSpace":
        problems = [
            f"{name}: low {lo} must be > 0 and <= high {hi}"
            for name in ("lr", "depth", "width", "channels", "backbone_lr_scale")
            for lo, hi in [getattr(self, name)]
            if not 0 < lo <= hi
        ]
        if not 0 <= self.freeze_epochs[0] <= self.freeze_epochs[1]:
            problems.append(f"freeze_epochs: need 0 <= low <= high, got {self.freeze_epochs}")
        if not 0 <= self.dropout[0] <= self.dropout[1] < 1:
            problems.append(f"dropout: need 0 <= low <= high < 1, got {self.dropout}")
        problems += [f"kernels: {k} is not a positive odd size" for k in self.kernels if k < 1 or k % 2 == 0]
        problems += [f"batch_sizes: {b} must be >= 1" for b in self.batch_sizes if b < 1]
        problems += [f"weight_decay: {w} must be >= 0" for w in self.weight_decay if w < 0]
        if problems:
            raise ValueError("; ".join(problems))
        return self


Objective = Literal["accuracy", "latency", "size"]


class SearchConfig(_Section):
    sampler: Literal["tpe", "random", "grid", "cmaes", "nsga2", "greedy", "genetic"] = Field(
        "tpe", description="tpe (Bayesian), random, grid, cmaes (single objective), nsga2 (evolutionary, Pareto), "
        "greedy (hill climbing one parameter at a time, random restarts), genetic (real-coded GA: tournament "
        "selection, simulated binary crossover, mutation, elitism).")
    # Not a setting: the run copies the top-level model section here, for the trials that rebuild it.
    model: ModelConfig = Field(default_factory=ModelConfig, exclude=True)
    greedy_patience: int = Field(8, ge=1, description="greedy: trials without improvement before a random restart.")
    greedy_step: float = Field(0.25, gt=0, le=1, description="greedy: a numeric move's std-dev as a share of its range.")
    population: int | None = Field(None, ge=2, description="nsga2/genetic: population size (default n_trials/3, 4..20).")
    mutation_prob: float | None = Field(None, gt=0, le=1, description="genetic: per-parameter mutation probability "
                                        "(default 1 / number of parameters).")
    pruner: Literal["none", "median", "hyperband", "successive_halving"] = Field(
        "none", description="Stop poor trials early on their per-epoch val accuracy (single objective only).")
    objectives: list[Objective] = Field(
        ["accuracy"], min_length=1, description="accuracy (val, maximised) first; latency (ORT CPU p50 ms) and size "
        "(parameters) are minimised. More than one makes the study multi-objective.")
    selection: Literal["best_accuracy", "accuracy_under_latency", "accuracy_under_size"] = Field(
        "best_accuracy", description="How the final configuration is picked from the Pareto front.")
    latency_budget_ms: float | None = Field(None, gt=0, description="Budget for accuracy_under_latency.")
    size_budget_params: int | None = Field(None, gt=0, description="Budget for accuracy_under_size.")
    n_trials: int = Field(12, ge=1, description="Finished trials to reach (an interrupted study resumes up to this count).")
    grid_points: int = Field(3, ge=1, description="Values per numeric range when sampler is grid.")
    epochs: int = Field(8, ge=1, description="Training budget per trial, in epochs.")
    cv_folds: int = Field(1, ge=1, le=20, description="1: trials are scored on the val split. k > 1: each trial "
                          "trains k times on stratified folds of train + val and is scored by its mean fold-accuracy "
                          "curve's best epoch (for small data, where a few val rows cannot tell trials apart; "
                          "no pruning then).")
    seed: int = Field(0, description="Sampler seed: same seed, same trials (with workers: 1).")
    workers: int = Field(1, ge=1, description="Trials run concurrently as Prefect tasks on one shared study.")
    warm_start: int = Field(5, ge=0, description="On a new data version, first re-run this many best trials of the "
                            "latest study with the same search config (0: start from zero).")
    storage: str | None = Field(
        None, description="Optuna storage: an RDB URL (sqlite:///, postgresql://) or journal:///path/file.log; "
        "default SQLite under the work dir, or a journal file when workers > 1.")
    space: SearchSpace = Field(default_factory=SearchSpace, description="What the search may choose.")

    @model_validator(mode="after")
    def _strategy_fits(self) -> "SearchConfig":
        problems = []
        multi = len(self.objectives) > 1
        if self.objectives[0] != "accuracy" or len(set(self.objectives)) != len(self.objectives):
            problems.append(f"objectives: must start with 'accuracy' and not repeat, got {self.objectives}")
        if multi and self.pruner != "none":
            problems.append("pruner: multi-objective studies cannot prune; set pruner: none")
        if multi and self.sampler in ("cmaes",):
            problems.append("sampler: cmaes is single-objective; use nsga2, tpe or random")
        needs = {"accuracy_under_latency": ("latency", self.latency_budget_ms, "latency_budget_ms"),
                 "accuracy_under_size": ("size", self.size_budget_params, "size_budget_params")}
        if self.selection in needs:
            objective, budget, field_name = needs[self.selection]
            if objective not in self.objectives:
                problems.append(f"selection: {self.selection} needs '{objective}' in objectives")
            if budget is None:
                problems.append(f"selection: {self.selection} needs {field_name}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class TrainConfig(_Section):
    """Final training of the searched configuration (its lr, optimizer, batch size, weight decay and
    schedule come from the search)."""

    max_epochs: int = Field(40, ge=1, description="Upper bound on training epochs.")
    patience: int = Field(6, ge=1, description="Early stopping: epochs without val-accuracy gain before stopping.")
    init_from: Path | None = Field(None, description="Checkpoint to fine-tune from instead of a random init.")
    seed: int = Field(0, description="Torch seed for initialisation and shuffling.")
    refit: bool = Field(False, description="Once early stopping on val has found the best epoch count, train again "
                        "from the same start on train + val for that many epochs (small data sets gain most).")
    processes: int = Field(1, ge=1, le=64, description="Data-parallel training (DistributedDataParallel) over this many "
                           "processes on this machine: gloo on CPU, NCCL with one GPU each when there are enough.")


class _Step(_Section):
    """A compression step; `method` selects its handler in tasks.compress_model."""


class _Finetuned(_Step):
    finetune_epochs: int = Field(5, ge=0, description="Fine-tuning epochs after the step.")
    finetune_lr_scale: float = Field(0.1, gt=0, description="Fine-tuning lr as a multiple of the baseline's lr.")


class MagnitudePrune(_Finetuned):
    method: Literal["magnitude_prune"]
    sparsity: float = Field(0.5, ge=0, lt=1, description="Final fraction of conv/linear weights set to zero (by |w|).")
    scope: Literal["global", "layer"] = Field("global", description="Rank weights across all layers or within each.")
    steps: int = Field(1, ge=1, description="Iterative schedule: sparsity ramps up over this many prune+fine-tune steps.")
    finetune_epochs: int = Field(5, ge=0, description="Fine-tuning epochs after each step, with the mask held fixed.")


class StructuredPrune(_Finetuned):
    method: Literal["structured_prune"]
    amount: float = Field(0.5, ge=0, lt=1, description="Fraction of channels/neurons removed from every hidden layer.")
    norm: Literal[1, 2] = Field(1, description="Rank channels/neurons by the L1 or L2 norm of their weights.")
    finetune_epochs: int = Field(10, ge=0, description="Fine-tuning epochs of the rebuilt, smaller model.")


class StudentSpec(_Section):
    """A built-in distillation student, as the parameters a search trial of its family would pick.
    Bounded: a student is meant to be small, and a typo of a few digits must not allocate gigabytes."""

    family: Literal["mlp", "cnn", "resnet", "text"] = Field(..., description="The student's built-in family.")
    depth: int = Field(..., ge=1, le=8, description="Hidden layers (mlp; text: embedding + depth-1), conv blocks "
                       "(cnn) or residual stages (resnet).")
    width: int | None = Field(None, ge=1, le=4096, description="Hidden units (mlp, the cnn's head, the text "
                              "embedding); resnet has none.")
    channels: int | None = Field(None, ge=1, le=512, description="Channels of the first conv block or stage "
                                 "(cnn, resnet), doubling per block.")
    activation: Activation = Field("relu", description="Activation function.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout after each hidden layer.")
    kernel: int = Field(3, ge=1, le=15, description="Conv kernel size (odd).")

    @model_validator(mode="after")
    def _fits_family(self) -> "StudentSpec":
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


class Distill(_Step):
    method: Literal["distill"]
    width_factor: float = Field(0.5, gt=0, le=1, description="Student width/channels as a share of the teacher's.")
    depth: int | None = Field(None, ge=1, description="Student depth; default the teacher's (a Hugging Face "
                              "teacher: half its transformer layers, spread from the first to the last).")
    conv: list[int] | None = Field(None, description="Explicit student conv channels (e.g. from a search trial); overrides width_factor.")
    hidden: list[int] | None = Field(None, description="Explicit student hidden widths; overrides width_factor.")
    student: StudentSpec | None = Field(None, description="A built-in student for any teacher (a resnet, your module, "
                                        "a Hugging Face model), as search parameters: e.g. {family: text, width: 128, "
                                        "depth: 2} or {family: cnn, channels: 16, depth: 2, width: 64}; overrides the "
                                        "scaled teacher.")
    temperature: float = Field(4.0, gt=0, description="Softmax temperature of the KL term.")
    alpha: float = Field(0.7, ge=0, le=1, description="Weight of the KL term; 1-alpha weights the hard-label loss.")
    epochs: int = Field(30, ge=1, description="Student training epochs (early stopping applies).")


class Binarize(_Finetuned):
    method: Literal["binarize"]
    keep_first_last: bool = Field(True, description="Keep the first and the last layer in full precision (as "
                                  "XNOR-Net does): they hold few weights and much of the accuracy.")
    finetune_epochs: int = Field(20, ge=1, description="Training epochs with binary weights (straight-through estimator).")
    finetune_lr_scale: float = Field(0.5, gt=0, description="Training lr as a multiple of the baseline's lr.")


class SparsityTrain(_Finetuned):
    method: Literal["sparsity_train"]
    target: Literal["channels", "weights"] = Field(
        "channels", description="channels: group L1 (the sum of every conv filter's / hidden neuron's weight L2 "
        "norm, as network slimming does on BatchNorm scales) drives whole channels to zero before "
        "structured_prune; weights: plain L1, before magnitude_prune.")
    penalty: float = Field(1e-3, gt=0, description="Weight of the L1 term beside the cross-entropy.")
    finetune_epochs: int = Field(10, ge=1, description="Fine-tuning epochs with the penalty.")
    finetune_lr_scale: float = Field(0.5, gt=0, description="Fine-tuning lr as a multiple of the baseline's lr.")


class QuantizeAware(_Finetuned):
    method: Literal["quantize_aware"]
    finetune_epochs: int = Field(5, ge=1, description="Fine-tuning epochs with fake-quantized weights and activations.")
    calibration_samples: int = Field(256, ge=1, description="Training samples that calibrate the exported QDQ model.")
    per_channel: bool = Field(True, description="Per-channel weight scales (in training and in the export).")


class QuantizeDynamic(_Step):
    method: Literal["quantize_dynamic"]
    per_channel: bool = Field(False, description="Per-channel weight scales.")


class QuantizeStatic(_Step):
    method: Literal["quantize_static"]
    calibration_samples: int = Field(256, ge=1, description="Training samples fed to the calibrator.")
    calibrate_method: Literal["minmax", "entropy", "percentile"] = Field("minmax", description="Activation range estimator.")
    per_channel: bool = Field(True, description="Per-channel weight scales.")
    max_accuracy_loss: float | None = Field(
        None, ge=0, description="Accuracy-aware tuning: allowed val-accuracy loss (points) vs FP32; nodes fall back "
        "to FP32, most sensitive first, until it holds. None = quantize everything.")
    max_fallback_nodes: int = Field(8, ge=1, description="Most nodes accuracy-aware tuning may keep in FP32.")


class ConvertFp16(_Step):
    method: Literal["convert_fp16"]
    keep_io_types: bool = Field(True, description="Keep float32 inputs/outputs so callers need no change.")


Step = Annotated[
    Union[MagnitudePrune, StructuredPrune, Distill, Binarize, SparsityTrain, QuantizeDynamic, QuantizeStatic,
          QuantizeAware, ConvertFp16],
    Field(discriminator="method"),
]


def _default_candidates() -> dict[str, list]:
    return {
        "pruned": [MagnitudePrune(method="magnitude_prune")],
        "student": [Distill(method="distill")],
        "int8_dynamic": [QuantizeDynamic(method="quantize_dynamic")],
        "int8_static": [QuantizeStatic(method="quantize_static")],
    }


class _Recipes(_Section):
    """Candidate name -> recipe; the handler registry in `_registry` knows which steps act on ONNX."""

    _registry: ClassVar[str]

    @model_validator(mode="after")
    def _recipes_valid(self) -> "_Recipes":
        onnx_methods = importlib.import_module(self._registry).ONNX_METHODS
        problems = []
        for name, steps in self.candidates.items():
            if name == "baseline":
                problems.append("'baseline' is reserved for the uncompressed FP32 model")
            if not steps:
                problems.append(f"candidate {name!r}: empty recipe")
            kinds = [s.method in onnx_methods for s in steps]
            if kinds != sorted(kinds):
                problems.append(f"candidate {name!r}: torch steps cannot follow an ONNX step (quantize last)")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class CompressConfig(_Recipes):
    _registry: ClassVar[str] = "tasks.compress_model"
    candidates: dict[str, list[Step]] = Field(
        default_factory=_default_candidates,
        description="Candidate name -> recipe: steps applied in order to the trained FP32 baseline.",
    )


class DistillLayers(_Step):
    method: Literal["distill_layers"]
    keep: list[int] = Field([0, 2, 5], min_length=1, description="Teacher layers the student starts from (its depth); "
                            "keeping the last one keeps the embedding space (measured: far better than 0, 2, 4).")
    epochs: int = Field(8, ge=1, description="Passes over the training sentences.")
    lr: float = Field(3e-4, gt=0, description="Peak AdamW learning rate (linear warm-up, cosine decay).")
    batch: int = Field(32, ge=1, description="Sentences per step.")


class OrtOptimize(_Step):
    method: Literal["ort_optimize"]
    opt_level: Literal[0, 1, 2, 99] = Field(
        1, description="ONNX Runtime graph-optimisation level applied before the transformer fusions (1 = basic).")


EncoderStep = Annotated[Union[DistillLayers, OrtOptimize, QuantizeDynamic], Field(discriminator="method")]


def _default_encoder_candidates() -> dict[str, list]:
    student = DistillLayers(method="distill_layers")
    int8 = QuantizeDynamic(method="quantize_dynamic", per_channel=True)
    return {"optimized": [OrtOptimize(method="ort_optimize")],
            "int8": [OrtOptimize(method="ort_optimize"), int8],
            "student": [student], "student_int8": [student, OrtOptimize(method="ort_optimize"), int8]}


class EncoderCompressConfig(_Recipes):
    _registry: ClassVar[str] = "tasks.compress_encoder"
    candidates: dict[str, list[EncoderStep]] = Field(
        default_factory=_default_encoder_candidates,
        description="Candidate name -> recipe: steps applied in order to the exported FP32 teacher.",
    )


class EncoderConfig(_Section):
    family: Literal["minilm"] = Field("minilm", description="Pretrained encoder shipped in a package (no hub access).")
    num_layers: int | None = Field(None, ge=1, le=6, description="Keep only the first N transformer layers (fast tests).")
    max_length: int = Field(128, ge=8, le=512, description="Tokenizer truncation length.")
    timing_seq_len: int = Field(128, ge=8, le=512, description="Sequence length every timed input is padded to.")
    min_export_cosine: float = Field(0.9999, gt=0, le=1, description="Worst per-sentence cosine, ORT vs PyTorch, an export must reach.")


class ValidateConfig(_Section):
    warmup: int = Field(20, ge=0, description="Untimed runs before measuring.")
    latency_runs: int = Field(500, ge=5, description="Timed batch-1 runs for the p50/p95 latency.")
    throughput_batch: int = Field(64, ge=1, description="Batch size of the throughput measurement.")
    throughput_runs: int = Field(100, ge=1, description="Timed batches for the throughput measurement.")
    intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads (0 = runtime default).")
    use_cuda: bool = Field(True, description="Also measure on CUDAExecutionProvider when it is available.")


class GateConfig(_Section):
    max_accuracy_drop: float = Field(1.0, ge=0, description="Allowed test-accuracy drop vs the FP32 baseline, in points.")
    min_accuracy: float = Field(0.90, ge=0, le=1, description="Absolute floor on test accuracy.")
    max_parity_error: float = Field(1e-4, gt=0, description="Max |ORT - PyTorch| on test logits for exported models.")
    max_latency_ratio: float | None = Field(
        1.1, gt=0,
        description="Reject a compressed model whose p50 latency exceeds this multiple of the baseline's "
        "(1.1 leaves room for timing noise on models that run in microseconds).",
    )
    min_cosine_worst: float = Field(0.97, ge=-1, le=1, description="Embeddings: floor on the worst per-sentence cosine to the FP32 model.")
    min_cosine_mean: float = Field(0.99, ge=-1, le=1, description="Embeddings: floor on the mean per-sentence cosine.")
    min_top10_overlap: float = Field(0.8, ge=0, le=1, description="Embeddings: floor on top-10 retrieval overlap with the FP32 model.")
    select_by: Literal["latency_p50_ms", "size_bytes", "quality"] = Field(
        "latency_p50_ms", description="Among passing candidates pick the lowest latency/size or the best primary quality "
        "(accuracy; worst-case cosine for embeddings)."
    )
    latency_tie: float = Field(
        1.05, ge=1, description="select_by latency: a candidate counts as slower than the fastest only when the 95% "
        "interval of its latency ratio over the timing rounds lies above this; the tied ones are ranked by quality, "
        "then size (so timing noise never decides).")


class RegisterConfig(_Section):
    model_name: str = Field("digits-classifier", min_length=1, description="MLflow registered-model name.")
    alias: str = Field("candidate", min_length=1, description="Registry alias set on the new version.")
    bundle_dir: Path = Field(Path("deploy/bundle"), description="Serving bundle folder (replaced atomically).")


class PromoteConfig(_Section):
    champion_alias: str = Field("champion", min_length=1, description="Registry alias of the model in service.")
    previous_alias: str = Field("previous-champion", min_length=1, description="Alias kept for one-command rollback.")
    quality_tolerance: float = Field(
        0.25, ge=0, description="Points (hundredths of the primary quality: accuracy, worst-case cosine) within which "
        "a challenger 'matches' the champion; it then needs to be faster.")
    significance: float = Field(
        0.05, gt=0, lt=1, description="A challenger is better only if the paired test on the same test samples says so "
        "at this level (McNemar's exact test for classifiers, a paired bootstrap otherwise).")
    min_speedup: float = Field(
        1.05, ge=1, description="A matching challenger is promoted only if the 95% interval of its speed-up over the "
        "champion (timed side by side) lies above this.")
    champion_bundle_dir: Path = Field(Path("deploy/champion"), description="Bundle the server loads; replaced atomically on promotion.")


SERVER_DATABASES = ("postgresql", "mysql", "mssql", "oracle")  # SQLAlchemy dialects several machines can share


def is_server_database(url: str) -> bool:
    return url.split(":", 1)[0].split("+", 1)[0] in SERVER_DATABASES


class RunnerConfig(_Section):
    """Where the search trials run. Every worker gets all it needs from the config: the data by its
    DVC md5 from the remote, the tracking store and the study storage by URL."""

    kind: Literal["local", "dask", "ray"] = Field(
        "local", description="local: threads of the run's own process; dask: a Dask cluster, or with no address a "
        "LocalCluster of `search.workers` processes on this machine; ray: a Ray cluster.")
    address: str | None = Field(None, description="Scheduler of a running cluster (dask: tcp://host:8786; "
                                "ray: ray://host:10001). None: dask starts a LocalCluster, ray a local instance.")
    data_cache: str = Field("~/.cache/modelforge/data", description="Folder, on each worker's machine, where the "
                            "worker keeps the data versions it fetched from the DVC remote.")

    @property
    def multi_machine(self) -> bool:
        """Workers may sit on other machines: nothing local to the driver (files, SQLite) is shared."""
        return self.kind == "ray" or (self.kind == "dask" and self.address is not None)


class TrackingConfig(_Section):
    uri: str = Field("sqlite:///.modelforge/mlflow.db", description="MLflow tracking URI: sqlite:/// (default), a "
                     "server database (postgresql+psycopg://user@host/db) or an MLflow server (http://host:5000).")
    experiment: str = Field("modelforge", min_length=1, description="MLflow experiment name.")
    artifact_dir: Path = Field(Path(".modelforge/mlartifacts"), description="Artifact root of a new experiment "
                               "(an MLflow server, http://..., uses its own artifact store instead).")


class _Pipeline(_Section):
    """What every pipeline shares: where it writes, how candidates are judged, registered,
    promoted and tracked."""

    workdir: Path = Field(Path(".modelforge"), description="Everything a run writes (checkpoints, ONNX, studies).")
    validate_: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate")
    gates: GateConfig = Field(default_factory=GateConfig)
    register_: RegisterConfig = Field(default_factory=RegisterConfig, alias="register")
    promote: PromoteConfig = Field(default_factory=PromoteConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def anchored(self, root: Path):
        """The same config with every relative path (top level or one section down) anchored at
        `root` (the project folder), the SQLite tracking URI included."""
        root = Path(root).resolve()
        at = lambda p: root / p if isinstance(p, Path) and not p.is_absolute() else p
        update = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, BaseModel):
                update[name] = value.model_copy(update={k: at(getattr(value, k)) for k in type(value).model_fields})
            else:
                update[name] = at(value)
        uri = self.tracking.uri
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            uri = f"sqlite:///{root / uri.removeprefix('sqlite:///')}"
        update["tracking"] = update["tracking"].model_copy(update={"uri": uri})
        remote = self.data.dvc_remote
        if "://" not in remote and not Path(remote).is_absolute():
            update["data"] = update["data"].model_copy(update={"dvc_remote": str(root / remote)})
        return self.model_copy(update=update)

    def resolved(self, root: Path):
        """`anchored` at `root`, and refused with one `ConfigError` when a folder it writes is unsafe."""
        root = Path(root).resolve()
        resolved = self.anchored(root)
        if problems := resolved.path_problems(root):
            raise ConfigError(f"unsafe paths in the config ({len(problems)} problem(s)):\n"
                              + "\n".join(f"  - {p}" for p in problems))
        return resolved

    def path_problems(self, root: Path) -> list[str]:
        """Folders a run writes, replaces or versions must lie strictly inside the project; a bundle
        folder (replaced whole on every ship) must not hold the project's other folders or each
        other, and if it exists it must be a bundle modelforge wrote."""
        from tasks.guard_bundle import bundle_problem

        written = {"workdir": self.workdir, "data.dir": self.data.dir,
                   "register.bundle_dir": self.register_.bundle_dir,
                   "promote.champion_bundle_dir": self.promote.champion_bundle_dir}
        where = {name: Path(path).resolve() for name, path in written.items()}
        problems = [f"{name}: {path} is {'the project folder itself' if path == root else 'outside the project'} "
                    f"({root}); use a folder inside it" for name, path in where.items()
                    if path == root or not path.is_relative_to(root)]
        for bundle in ("register.bundle_dir", "promote.champion_bundle_dir"):
            problems += [f"{bundle}: {where[bundle]} would contain {other} ({where[other]}), which a ship "
                         "replaces with the bundle" for other in where
                         if other != bundle and where[other].is_relative_to(where[bundle])]
            if where[bundle].is_relative_to(root) and where[bundle] != root and (why := bundle_problem(where[bundle])):
                problems.append(f"{bundle}: {why}; a ship would replace it")
        return problems

    def user_inputs(self) -> tuple[str | None, list[Path]]:
        """The user's model module (a spec) and the checkpoint files or folders the config names:
        their contents are inputs of the run as much as the config's text."""
        return None, []

    def section_hash(self, *sections: str) -> str:
        """Stable hash of the named sections, used in cache keys: same config, same key."""
        payload = {s: self.model_dump(mode="json", by_alias=True)[s] for s in sections}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def flat(self) -> dict[str, str]:
        """Dotted key -> value, for MLflow params."""
        out: dict[str, str] = {}

        def walk(prefix: str, value: object) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            else:
                out[prefix] = json.dumps(value) if isinstance(value, list) else str(value)

        walk("", self.model_dump(mode="json", by_alias=True))
        return out


class PipelineConfig(_Pipeline):
    """Classifier pipeline: data set -> search -> train -> compress -> validate -> ship."""

    family: Literal["classifier"] = Field("classifier", description="Which pipeline this file configures.")
    data: ClassifierData = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    compress: CompressConfig = Field(default_factory=CompressConfig)
    runner: RunnerConfig = Field(default_factory=RunnerConfig)

    def anchored(self, root: Path):
        """`_Pipeline.anchored`, and a relative pretrained checkpoint folder (model.pretrained and the
        text data's tokenizer; the packaged one is a name) taken as the project's."""
        from tasks.models.hf import PACKAGED

        root = Path(root).resolve()
        folder = lambda name: str(root / name) if name and name != PACKAGED and not Path(name).is_absolute() else name
        cfg = super().anchored(root)
        model = cfg.model.model_copy(update={"pretrained": folder(cfg.model.pretrained)})
        data = (cfg.data.model_copy(update={"tokenizer": folder(cfg.data.tokenizer)})
                if hasattr(cfg.data, "tokenizer") else cfg.data)
        return cfg.model_copy(update={"model": model, "data": data})

    def user_inputs(self) -> tuple[str | None, list[Path]]:
        from tasks.models.hf import pretrained_folder

        files = [self.model.weights, self.train.init_from, pretrained_folder(self.model.pretrained),
                 pretrained_folder(getattr(self.data, "tokenizer", None))]
        return self.model.spec, [Path(f) for f in files if f]

    @model_validator(mode="after")
    def _model_fits(self) -> "PipelineConfig":
        problems = []
        if "custom" in self.search.space.families and self.model.spec is None:
            problems.append("search.space.families names custom but model.spec is not set")
        if "hf" in self.search.space.families and self.model.pretrained is None:
            problems.append("search.space.families names hf but model.pretrained is not set")
        problems += self._students_missing()
        if self.model.pretrained is not None:
            if self.data.dataset == "table":
                problems.append(f"model.pretrained is {self.model.pretrained}: a pretrained Hugging Face model takes "
                                f"texts or images, and the data is {self.data.dataset}")
            elif self.data.dataset == "text" and self.data.tokenizer != self.model.pretrained:
                problems.append(f"model.pretrained is {self.model.pretrained}: its texts must be tokenized by it, so "
                                f"data.tokenizer must be {self.model.pretrained} too")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _students_missing(self) -> list[str]:
        """Distillation with no named student needs a teacher that makes its own (a narrower or shallower
        twin); found out after search and training, it used to fail the run at compression."""
        from tasks.models import FAMILIES

        teachers = [self.model.family] if self.model.family else self.search.space.families
        lacking = [f for f in teachers if f in FAMILIES and not (FAMILIES[f].scales or FAMILIES[f].shallower)]
        return [f"candidate {name!r}: distill has no student for a {lacking[0]} teacher (it has no scaled-down twin); "
                "name one, e.g. student: {family: mlp, width: 64, depth: 1}, or drop the candidate"
                for name, recipe in self.compress.candidates.items() if lacking
                and any(step.method == "distill" and step.student is None for step in recipe)]

    @model_validator(mode="after")
    def _val_held_out(self) -> "PipelineConfig":
        """Accuracy-aware INT8 measures its loss on val. A refit model has trained on val: the refit
        MiniLM classifier scored 1.0000 there with every INT8 variant (measured), so the loss reads
        zero and the tuning would stop at once, blind."""
        if not self.train.refit:
            return self
        tuned = [name for name, recipe in self.compress.candidates.items()
                 if any(getattr(step, "max_accuracy_loss", None) is not None for step in recipe)]
        if tuned:
            raise ValueError(f"candidates {', '.join(tuned)}: accuracy-aware quantization (max_accuracy_loss) measures "
                             "its loss on val, which train.refit trains on; drop one of the two")
        return self

    @model_validator(mode="after")
    def _runner_fits(self) -> "PipelineConfig":
        """Workers on other machines cannot share the driver's files: SQLite, a journal file, a
        relative folder. Refused here, before anything runs, not found out as trials landing in a
        stray store on each worker."""
        if not self.runner.multi_machine:
            return self
        where = f"runner.kind {self.runner.kind}" + (f" at {self.runner.address}" if self.runner.address else "")
        problems = []
        if not (self.search.storage and is_server_database(self.search.storage)):
            problems.append(f"search.storage is {self.search.storage or 'a file under the work dir (default)'}; with "
                            f"{where} the study must live in a server database every worker reaches, "
                            "e.g. postgresql+psycopg://user:password@host:5432/optuna")
        uri = self.tracking.uri
        if not (is_server_database(uri) or uri.startswith(("http://", "https://"))):
            problems.append(f"tracking.uri is {uri}; with {where} trial runs must go to a store every worker "
                            "reaches: an MLflow server (http://host:5000) or a server database "
                            "(postgresql+psycopg://user:password@host:5432/mlflow)")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class EncoderRegisterConfig(RegisterConfig):
    """The encoder's own registry name and bundle, so both pipelines can ship from one project."""

    model_name: str = Field("minilm-encoder", min_length=1, description="MLflow registered-model name.")
    bundle_dir: Path = Field(Path("deploy/minilm-bundle"), description="Serving bundle folder (replaced atomically).")


class EncoderPromoteConfig(PromoteConfig):
    champion_bundle_dir: Path = Field(Path("deploy/minilm-champion"), description="Champion bundle; replaced atomically on promotion.")


class EncoderPipelineConfig(_Pipeline):
    """Sentence-encoder pipeline: pretrained MiniLM -> ONNX -> optimise/quantise/distil -> validate -> ship."""

    family: Literal["minilm"] = Field("minilm", description="Which pipeline this file configures.")
    data: TextDataConfig = Field(default_factory=TextDataConfig)
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    compress: EncoderCompressConfig = Field(default_factory=EncoderCompressConfig)
    register_: EncoderRegisterConfig = Field(default_factory=EncoderRegisterConfig, alias="register")
    promote: EncoderPromoteConfig = Field(default_factory=EncoderPromoteConfig)

    @model_validator(mode="after")
    def _students_fit_teacher(self) -> "EncoderPipelineConfig":
        layers = self.encoder.num_layers or 6
        problems = [f"compress.candidates.{name}: keep={step.keep} but the teacher has layers 0..{layers - 1}"
                    for name, steps in self.compress.candidates.items() for step in steps
                    if isinstance(step, DistillLayers) and (max(step.keep) >= layers or min(step.keep) < 0)]
        if problems:
            raise ValueError("; ".join(problems))
        return self


class CorpusConfig(_Section):
    """A user's text corpus for a causal LM: a folder of .txt/.md files (one document each) and/or .jsonl files
    (one {"text": ...} document per line)."""

    dataset: Literal["text_corpus"] = Field("text_corpus", description="A folder of plain-text documents.")
    dir: Path = Field(Path("corpus"), description="DVC-tracked corpus folder (relative to the project root).")
    validation_fraction: float = Field(0.3, gt=0, lt=0.5, description="Share of documents (by hash) for gates "
                                       "and candidate selection.")
    test_fraction: float = Field(0.3, gt=0, lt=0.5, description="Share of documents (by hash) for the reported "
                                 "figures and champion/challenger; the rest calibrates.")
    window: int = Field(512, ge=8, le=8192, description="Tokens per perplexity window; every split must hold one.")
    max_windows: int = Field(16, ge=1, description="Most windows scored per split (bounds evaluation time).")
    # Not a setting: the run copies lm.model here, so versioning can count tokens with its tokenizer.
    model: Path | None = Field(None, exclude=True)
    dvc_remote: str = Field(".modelforge/dvc-remote", description="DVC remote the corpus is pushed to (a folder or a URL).")


class LMModelConfig(_Section):
    model: Path = Field(..., description="A local Hugging Face causal-LM folder (config.json, *.safetensors, tokenizer "
                        "files; pickled weights are refused) or a .gguf file.")
    max_length: int = Field(2048, ge=16, description="Context (prompt + generated tokens) the KV cache is sized for.")


LMAlgorithm = Literal["rtn", "k_quant", "hqq"]


class LMRecipe(_Section):
    """One weight-only quantization of the FP32 ONNX model through ONNX Runtime's MatMulNBitsQuantizer."""

    bits: Literal[4, 8] = Field(4, description="Weight bits of the decoder MatMuls.")
    algorithm: LMAlgorithm = Field("rtn", description="rtn (round to nearest), k_quant (llama.cpp-style scale "
                                   "search), hqq (half-quadratic; 4 bits).")
    block_size: Literal[32, 64, 128] = Field(32, description="Weights per quantization block.")
    symmetric: bool = Field(True, description="Symmetric blocks (no zero point); hqq always fits a float zero point.")
    accuracy_level: Literal[0, 4] = Field(0, description="For 4-bit weights, 0: float activations; 4: int8 "
                                          "activations (faster, known to flip argmax tokens on models with large "
                                          "activations). 8-bit weights always take int8 activations.")
    lm_head: Literal["fp32", "int8", "int4"] = Field("int8", description="Precision of the output projection "
                                                     "(int4 hurts small tied models).")
    int8_layers: int = Field(0, ge=0, description="Decoder layers measured most sensitive on the calibration text "
                             "kept at INT8 (4-bit recipes).")


class LMSearchConfig(_Section):
    """Optuna over the weight-only space, scored on validation perplexity and measured decode speed."""

    n_trials: int = Field(12, ge=0, description="Trials (0: only the fixed candidates).")
    seed: int = Field(0, description="Sampler seed.")
    bits: list[Literal[4, 8]] = Field([4, 8], min_length=1, description="Weight bits to try.")
    algorithms: list[LMAlgorithm] = Field(["rtn", "k_quant", "hqq"], min_length=1, description="Algorithms to try.")
    block_sizes: list[Literal[32, 64, 128]] = Field([32, 64, 128], min_length=1, description="Block sizes to try.")
    symmetric: list[bool] = Field([True, False], min_length=1, description="Symmetric and/or asymmetric blocks.")
    accuracy_levels: list[Literal[0, 4]] = Field([0, 4], min_length=1, description="Activation precisions to try.")
    lm_head: list[Literal["fp32", "int8", "int4"]] = Field(["int8", "int4"], min_length=1,
                                                          description="lm_head precisions to try.")
    int8_layers: list[int] = Field([0, 2, 4], min_length=1, description="Numbers of most-sensitive layers kept at INT8.")
    trial_windows: int = Field(4, ge=1, description="Windows scored per trial (validation) and per layer in the "
                               "sensitivity measurement (calibration); the gates score all data.max_windows.")
    keep: int = Field(3, ge=1, description="Pareto-front trials that become candidates (fastest first among those "
                      "within the perplexity gate).")


class LMCompressConfig(_Section):
    candidates: dict[str, LMRecipe] = Field(
        default_factory=lambda: {"int4_rtn": LMRecipe(), "int8": LMRecipe(bits=8)},
        description="Fixed candidates (name -> recipe) measured beside the searched ones.")
    search: LMSearchConfig = Field(default_factory=LMSearchConfig, description="The candidate search.")

    @property
    def uses_sensitivity(self) -> bool:
        """Whether any recipe keeps sensitive layers at INT8 (the per-layer measurement is then needed)."""
        return any(r.int8_layers for r in self.candidates.values()) or (
            self.search.n_trials > 0 and any(self.search.int8_layers))

    @model_validator(mode="after")
    def _names_free(self) -> "LMCompressConfig":
        if bad := [n for n in self.candidates if n == "baseline" or n.startswith(("trial_", "base_"))]:
            raise ValueError(f"candidate names {bad}: 'baseline', 'trial_*' and 'base_*' are the pipeline's own")
        return self


class LMValidateConfig(_Section):
    threads: int = Field(2, ge=1, description="ONNX Runtime intra-op threads for every measurement.")
    prompt_lengths: list[int] = Field([32, 512], min_length=1, description="Prompt tokens at which time to first "
                                      "token and decode speed are measured (clipped to the context).")
    new_tokens: int = Field(64, ge=4, description="Greedy tokens decoded per timing.")
    rounds: int = Field(2, ge=1, description="Timing rounds, candidates interleaved; the best round counts.")


class LMGateConfig(_Section):
    max_ppl_increase_pct: float = Field(5.0, ge=0, description="Allowed validation-perplexity increase vs FP32, in %.")
    min_top1: float = Field(0.9, ge=0, le=1, description="Floor on top-1 next-token agreement with FP32.")
    max_kl: float = Field(0.1, ge=0, description="Ceiling on the mean KL divergence from FP32 (nats per token).")
    max_parity_error: float = Field(1e-3, gt=0, description="Max |ORT - PyTorch| FP32 logits on validation text.")
    min_decode_tok_s: float | None = Field(None, gt=0, description="Floor on decode tokens/s (shortest prompt).")
    max_ttft_ms: float | None = Field(None, gt=0, description="Ceiling on time to first token at the longest prompt.")
    max_peak_mb: float | None = Field(None, gt=0, description="Ceiling on peak memory generating at max_length.")
    max_size_mb: float | None = Field(None, gt=0, description="Ceiling on the model's size on disk.")
    select_by: Literal["latency_p50_ms", "size_bytes", "quality"] = Field(
        "latency_p50_ms", description="Among passing candidates: fastest decode (latency_p50_ms = ms per token), "
        "smallest, or best top-1 agreement.")


class LMRegisterConfig(RegisterConfig):
    model_name: str = Field("causal-lm", min_length=1, description="MLflow registered-model name.")
    bundle_dir: Path = Field(Path("deploy/lm-bundle"), description="Serving bundle folder (replaced atomically).")


class LMPromoteConfig(PromoteConfig):
    quality_tolerance: float = Field(1.0, ge=0, description="Test perplexity within this many percent of the "
                                     "champion's counts as a match; the challenger then needs faster decode.")
    champion_bundle_dir: Path = Field(Path("deploy/lm-champion"), description="Champion bundle; replaced atomically on promotion.")


class LMPipelineConfig(_Pipeline):
    """Causal-LM pipeline: model + corpus -> FP32 ONNX for generation -> weight-only candidates (searched) ->
    validate + gates -> register -> ship -> promote."""

    family: Literal["causal_lm"] = Field("causal_lm", description="Which pipeline this file configures.")
    data: CorpusConfig = Field(default_factory=CorpusConfig)
    lm: LMModelConfig
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    compress: LMCompressConfig = Field(default_factory=LMCompressConfig)
    validate_: LMValidateConfig = Field(default_factory=LMValidateConfig, alias="validate")
    gates: LMGateConfig = Field(default_factory=LMGateConfig)
    register_: LMRegisterConfig = Field(default_factory=LMRegisterConfig, alias="register")
    promote: LMPromoteConfig = Field(default_factory=LMPromoteConfig)

    def anchored(self, root: Path):
        cfg = super().anchored(root)
        return cfg.model_copy(update={"data": cfg.data.model_copy(update={"model": cfg.lm.model})})

    def user_inputs(self) -> tuple[str | None, list[Path]]:
        return None, [self.lm.model]  # not DVC-tracked: replaced in place, it must not look like the same run

    @model_validator(mode="after")
    def _fits_context(self) -> "LMPipelineConfig":
        if self.data.window > self.lm.max_length:
            raise ValueError(f"data.window ({self.data.window}) exceeds lm.max_length ({self.lm.max_length})")
        return self


PIPELINES: dict[str, type[_Pipeline]] = {"classifier": PipelineConfig, "minilm": EncoderPipelineConfig,
                                         "causal_lm": LMPipelineConfig}


MAX_CONFIG_BYTES = 256 * 2**10  # configs are a few KB; parsing 1 MB of YAML took 14 s here (pure Python)
MAX_PROBLEMS_SHOWN = 40  # a value repeated by aliases can fail once per copy; the first ones say it all


def excerpt(text: object, limit: int = 200) -> str:
    """`text` cut to `limit` characters, saying how long it was: an error quotes input, never all of it."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def problem_list(head: str, problems: list[str]) -> str:
    """`head (N problem(s)):` and one excerpted line per problem, at most MAX_PROBLEMS_SHOWN of them."""
    lines = [f"  - {excerpt(p, 300)}" for p in problems[:MAX_PROBLEMS_SHOWN]]
    if len(problems) > MAX_PROBLEMS_SHOWN:
        lines.append(f"  - ... and {len(problems) - MAX_PROBLEMS_SHOWN} more")
    return f"{head} ({len(problems)} problem(s)):\n" + "\n".join(lines)


def _format_errors(errors: list[dict]) -> list[str]:
    return [f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in errors]


def _expanded_size(root: yaml.Node) -> float:
    """About how many characters `root` stands for with every alias written out (8 per node besides
    its text), computed once per distinct node; an alias inside its own anchor is a cycle: infinite."""
    sizes: dict[int, float] = {}
    open_: set[int] = set()

    def size(node: yaml.Node) -> float:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_:
            return math.inf
        open_.add(id(node))
        if isinstance(node, yaml.ScalarNode):
            total = 8 + len(node.value)
        elif isinstance(node, yaml.SequenceNode):
            total = 8 + sum(size(item) for item in node.value)
        else:
            total = 8 + sum(size(key) + size(value) for key, value in node.value)
        open_.discard(id(node))
        sizes[id(node)] = total
        return total

    return size(root)


def _section_keys(annotation: object) -> set[str] | None:
    """The keys a field of this type takes when it is a section (the union of a union's members'),
    None when it is not one (a value, or a mapping of names such as the candidates)."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _section_keys(typing.get_args(annotation)[0])
    if origin is Union:
        found = [k for arg in typing.get_args(annotation) if (k := _section_keys(arg)) is not None]
        return set().union(*found) if found else None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return {key for name, f in annotation.model_fields.items() for key in (name, f.alias) if key}
    return None


def _drop_unknown_keys(root: yaml.MappingNode) -> list[str]:
    """Keys the pipeline and its sections do not take, removed from the parsed file before any value
    is built (a huge or alias-bombed value under a misspelt key is never expanded), one problem each."""
    family = next((v.value for k, v in root.value if k.value == "family" and isinstance(v, yaml.ScalarNode)),
                  "classifier")
    if family not in PIPELINES:
        return []  # parse_config names the unknown family
    problems: list[str] = []

    def prune(node: yaml.MappingNode, keys: set[str], where: str) -> None:
        kept = []
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else key.tag
            if name in keys or key.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` brings known keys
                kept.append((key, value))
            else:
                problems.append(f"{where}{excerpt(name, 80)}: unknown key (line {key.start_mark.line + 1}), not read")
        node.value[:] = kept

    cls = PIPELINES[family]
    prune(root, _section_keys(cls), "")
    fields = {key: f for name, f in cls.model_fields.items() for key in (name, f.alias) if key}
    for key, value in root.value:
        if isinstance(value, yaml.MappingNode) and key.value in fields and (
                keys := _section_keys(fields[key.value].annotation)):
            prune(value, keys, f"{key.value}.")
    return problems


def _safe_yaml(text: str, what: str, prune: bool = False) -> tuple[object, list[str]]:
    """`text` as YAML, refused with a ConfigError when its aliases expand past MAX_CONFIG_BYTES (the
    nodes are checked before any value is built); with `prune`, the unknown keys of a config's
    sections are dropped first and returned as problems."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, []
        unknown = _drop_unknown_keys(node) if prune and isinstance(node, yaml.MappingNode) else []
        if (size := _expanded_size(node)) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{what}: an alias (*name) refers to its own anchor (&name), a cycle" if size == math.inf
                              else f"{what} expands to about {size / 2**10:,.0f} KB with its YAML aliases (*name) written "
                              f"out, over the {MAX_CONFIG_BYTES // 2**10} KB limit (an alias bomb?); write the "
                              "values out or use fewer aliases")
        return loader.construct_document(node), unknown
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} is not valid YAML: {excerpt(err, 500)}") from None
    except RecursionError:
        raise ConfigError(f"{what} nests too deeply") from None
    finally:
        loader.dispose()


def read_config_file(path: str | Path) -> tuple[dict, list[str]]:
    """The config file as a mapping, and its unknown keys as problems. Refused with a ConfigError
    before it is parsed when it is over MAX_CONFIG_BYTES, and when its aliases expand past that."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)  # a bounded read: the "file" may be a pipe or /dev/zero
            size = max(len(data), os.fstat(f.fileno()).st_size)
    except OSError as err:
        raise ConfigError(f"cannot read config {path}: {err.strerror}") from None
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config {path} is over the {MAX_CONFIG_BYTES // 2**10} KB limit for a config file "
                          f"({size:,} bytes or more; a config is a few KB: is it the right file?)")
    try:
        text = data.decode()
    except UnicodeDecodeError as err:
        raise ConfigError(f"config {path} is not UTF-8 text (byte {err.start})") from None
    raw, unknown = _safe_yaml(text, f"config {path}", prune=True)
    if raw is None:
        return {}, []
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a mapping of sections, got {type(raw).__name__}")
    return raw, unknown


def _without(raw: object, loc: tuple) -> bool:
    """Delete from `raw` the deepest mapping key on the error location `loc` (union tags that are not
    keys are skipped); False when there is nothing left to delete (an error about the whole file)."""
    target, key, node = None, None, raw
    for part in loc:
        if isinstance(node, dict) and part in node:
            target, key, node = node, part, node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
    if target is None:
        return False
    del target[key]
    return True


def _all_errors(cls: type[BaseModel], raw: dict) -> list[dict]:
    """Every problem in one pass. Pydantic runs a section's cross-field checks only once its fields
    are valid, so each failing key is dropped (falling back to its default) and the rest validated
    again, until the errors stop changing: a bad field and a cross-field conflict show together."""
    errors: list[dict] = []
    work = copy.deepcopy(raw)
    for _ in range(8):  # nesting depth bounds the rounds; 8 is ample
        try:
            cls.model_validate(work)
            break
        except ValidationError as err:
            fresh = [e for e in err.errors() if (e["loc"], e["msg"]) not in {(x["loc"], x["msg"]) for x in errors}]
            errors += fresh
            if not fresh or not all([_without(work, e["loc"]) for e in fresh]):
                break
    return errors


def parse_config(raw: dict, source: str = "<dict>", unknown: list[str] | tuple[str, ...] = ()
                 ) -> "PipelineConfig | EncoderPipelineConfig | LMPipelineConfig":
    """Validate `raw` against the pipeline its `family` key names (default: classifier); `unknown`:
    problems found while reading it (keys dropped before validation), reported with the others."""
    family = raw.get("family", "classifier")
    if family not in PIPELINES:
        raise ConfigError(f"invalid config {source}: family {excerpt(repr(family), 80)} is not one of {sorted(PIPELINES)}")
    try:
        cfg, errors = PIPELINES[family].model_validate(raw), []
    except ValidationError:
        cfg, errors = None, _all_errors(PIPELINES[family], raw)
    if problems := [*unknown, *_format_errors(errors)]:
        raise ConfigError(problem_list(f"invalid config {source}", problems))
    return cfg


def tracking_of(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrackingConfig:
    """The tracking section of a config that may be invalid elsewhere (so a failed run is filed
    under the experiment the user named); the defaults when that section itself is unusable."""
    try:
        raw = apply_overrides(read_config_file(path)[0], overrides)
        return TrackingConfig.model_validate(raw.get("tracking") or {})
    except (ValidationError, AttributeError, ConfigError):
        return TrackingConfig()


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """`raw` with each `dotted.key=value` set (the value read as YAML: 3, 0.5, true, [a, b], text), as
    `modelforge run --set search.n_trials=3` asks; the result is validated like the file itself."""
    out, problems = copy.deepcopy(raw), []
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            problems.append(f"--set {item!r}: expected KEY=VALUE with a dotted KEY (e.g. search.n_trials=3)")
            continue
        node = out
        for depth, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(f"--set {item!r}: {'.'.join(parts[: depth + 1])} is not a section")
                break
        else:
            try:
                node[parts[-1]] = _safe_yaml(text, f"--set {excerpt(repr(item), 80)}: the value")[0]
            except ConfigError as err:
                problems.append(str(err))
    if problems:
        raise ConfigError("invalid overrides:\n" + "\n".join(f"  - {p}" for p in problems))
    return out


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> "PipelineConfig | EncoderPipelineConfig | LMPipelineConfig":
    """The config file at `path`, with `overrides` (`dotted.key=value`) applied, validated as one."""
    raw, unknown = read_config_file(path)
    source = f"{path}" + (f" with --set {' '.join(overrides)}" if overrides else "")
    return parse_config(apply_overrides(raw, overrides), excerpt(source), unknown)
