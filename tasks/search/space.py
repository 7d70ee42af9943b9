"""What a search may choose (the space) and how it chooses (sampler, objectives, budget)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tasks.core.settings import Section
from tasks.models import Activation, ModelConfig, Optimizer, Schedule


class SearchSpace(Section):
    families: list[Literal["mlp", "cnn", "resnet", "text", "custom", "hf"]] = Field(
        ["cnn", "mlp"],
        min_length=1,
        description="Model families to search over (resnet: residual CNN with "
        "BatchNorm; text: 4 bags of word embeddings, each then an MLP, logits averaged; custom: the model section's "
        "own module; hf: its pretrained Hugging Face checkpoint).",
    )
    lr: tuple[float, float] = Field((1e-3, 3e-2), description="Log-uniform learning-rate range.")
    weight_decay: list[float] = Field([0.0, 1e-4], min_length=1, description="L2 penalties to try.")
    batch_sizes: list[int] = Field([32, 64], min_length=1, description="Mini-batch sizes to try.")
    optimizers: list[Optimizer] = Field(
        ["sgd", "momentum", "adam", "adamw"],
        min_length=1,
        description="sgd (plain), momentum (SGD+Nesterov 0.9), adam, adamw.",
    )
    schedules: list[Schedule] = Field(["cosine", "constant"], min_length=1, description="Learning-rate schedules.")
    depth: tuple[int, int] = Field(
        (1, 3), description="Hidden layers (mlp), conv blocks (cnn) or residual stages (resnet), inclusive range."
    )
    width: tuple[int, int] = Field((32, 128), description="Hidden units per layer (log-uniform), inclusive range.")
    activations: list[Activation] = Field(["relu", "gelu"], min_length=1, description="Activation functions.")
    dropout: tuple[float, float] = Field((0.0, 0.3), description="Dropout after each hidden layer, range.")
    channels: tuple[int, int] = Field((8, 32), description="Channels of the first conv block (doubling per block).")
    kernels: list[int] = Field([3], min_length=1, description="Conv kernel sizes (odd).")
    freeze_epochs: tuple[int, int] = Field(
        (0, 0),
        description="Fine-tuning: epochs that train the new head only, "
        "the pretrained backbone frozen, before everything trains; inclusive range.",
    )
    backbone_lr_scale: tuple[float, float] = Field(
        (1.0, 1.0),
        description="Fine-tuning: the backbone's lr as a "
        "multiple of the head's (log-uniform range; 1 = one lr for all).",
    )
    augment: list[Literal["none", "shift"]] = Field(
        ["shift"],
        min_length=1,
        description="Training-time augmentation "
        "to try: shift moves each image by up to 1 px (images only; tables "
        "and other vectors are never augmented).",
    )

    @model_validator(mode="after")
    def _space_valid(self) -> SearchSpace:
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


class SearchConfig(Section):
    sampler: Literal["tpe", "random", "grid", "cmaes", "nsga2", "greedy", "genetic"] = Field(
        "tpe",
        description="tpe (Bayesian), random, grid, cmaes (single objective), nsga2 (evolutionary, Pareto), "
        "greedy (hill climbing one parameter at a time, random restarts), genetic (real-coded GA: tournament "
        "selection, simulated binary crossover, mutation, elitism).",
    )
    # Not a setting: the run copies the top-level model section here, for the trials that rebuild it.
    model: ModelConfig = Field(default_factory=ModelConfig, exclude=True)
    greedy_patience: int = Field(8, ge=1, description="greedy: trials without improvement before a random restart.")
    greedy_step: float = Field(
        0.25, gt=0, le=1, description="greedy: a numeric move's std-dev as a share of its range."
    )
    population: int | None = Field(
        None, ge=2, description="nsga2/genetic: population size (default n_trials/3, 4..20)."
    )
    mutation_prob: float | None = Field(
        None, gt=0, le=1, description="genetic: per-parameter mutation probability (default 1 / number of parameters)."
    )
    pruner: Literal["none", "median", "hyperband", "successive_halving"] = Field(
        "none", description="Stop poor trials early on their per-epoch val accuracy (single objective only)."
    )
    objectives: list[Objective] = Field(
        ["accuracy"],
        min_length=1,
        description="accuracy (val, maximised) first; latency (ORT CPU p50 ms) and size "
        "(parameters) are minimised. More than one makes the study multi-objective.",
    )
    selection: Literal["best_accuracy", "accuracy_under_latency", "accuracy_under_size"] = Field(
        "best_accuracy", description="How the final configuration is picked from the Pareto front."
    )
    latency_budget_ms: float | None = Field(None, gt=0, description="Budget for accuracy_under_latency.")
    size_budget_params: int | None = Field(None, gt=0, description="Budget for accuracy_under_size.")
    n_trials: int = Field(
        12, ge=1, description="Finished trials to reach (an interrupted study resumes up to this count)."
    )
    grid_points: int = Field(3, ge=1, description="Values per numeric range when sampler is grid.")
    epochs: int = Field(8, ge=1, description="Training budget per trial, in epochs.")
    cv_folds: int = Field(
        1,
        ge=1,
        le=20,
        description="1: trials are scored on the val split. k > 1: each trial "
        "trains k times on stratified folds of train + val and is scored by its mean fold-accuracy "
        "curve's best epoch (for small data, where a few val rows cannot tell trials apart; "
        "no pruning then).",
    )
    seed: int = Field(0, description="Sampler seed: same seed, same trials (with workers: 1).")
    workers: int = Field(1, ge=1, description="Trials run concurrently as Prefect tasks on one shared study.")
    warm_start: int = Field(
        5,
        ge=0,
        description="On a new data version, first re-run this many best trials of the "
        "latest study with the same search config (0: start from zero).",
    )
    storage: str | None = Field(
        None,
        description="Optuna storage: an RDB URL (sqlite:///, postgresql://) or journal:///path/file.log; "
        "default SQLite under the work dir, or a journal file when workers > 1.",
    )
    space: SearchSpace = Field(default_factory=SearchSpace, description="What the search may choose.")

    @model_validator(mode="after")
    def _strategy_fits(self) -> SearchConfig:
        problems = []
        multi = len(self.objectives) > 1
        if self.objectives[0] != "accuracy" or len(set(self.objectives)) != len(self.objectives):
            problems.append(f"objectives: must start with 'accuracy' and not repeat, got {self.objectives}")
        if multi and self.pruner != "none":
            problems.append("pruner: multi-objective studies cannot prune; set pruner: none")
        if multi and self.sampler in ("cmaes",):
            problems.append("sampler: cmaes is single-objective; use nsga2, tpe or random")
        needs = {
            "accuracy_under_latency": ("latency", self.latency_budget_ms, "latency_budget_ms"),
            "accuracy_under_size": ("size", self.size_budget_params, "size_budget_params"),
        }
        if self.selection in needs:
            objective, budget, field_name = needs[self.selection]
            if objective not in self.objectives:
                problems.append(f"selection: {self.selection} needs '{objective}' in objectives")
            if budget is None:
                problems.append(f"selection: {self.selection} needs {field_name}")
        if problems:
            raise ValueError("; ".join(problems))
        return self
