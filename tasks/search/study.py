"""The Optuna study a search fills: its storage (shared, so runs resume and workers cooperate), its
sampler and pruner, and what a trial suggests from the search space."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import optuna

from tasks.search.space import SearchConfig

DIRECTIONS = {"accuracy": "maximize", "latency": "minimize", "size": "minimize"}


def resolve_storage(cfg: SearchConfig, out_dir: Path) -> str:
    if cfg.storage:
        return cfg.storage
    # SQLite serialises writers badly under concurrent workers; Optuna's journal file is made for it.
    if cfg.workers > 1:
        return f"journal:///{(Path(out_dir) / 'optuna-journal.log').resolve()}"
    return f"sqlite:///{(Path(out_dir) / 'optuna.db').resolve()}"


def storage_of(url: str) -> optuna.storages.BaseStorage | str:
    if url.startswith("journal:///"):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url.removeprefix("journal://")))
    return url


def grid_space(cfg: SearchConfig) -> dict[str, list]:
    """Every parameter `suggest` asks for, as the finite list of values the grid visits."""
    s, n = cfg.space, cfg.grid_points

    def ints(lo: int, hi: int) -> list[int]:
        return sorted({round(v) for v in np.geomspace(lo, hi, n)})

    return {
        "family": list(s.families),
        "lr": sorted({float(v) for v in np.geomspace(*s.lr, n)}),
        "weight_decay": list(s.weight_decay),
        "batch_size": list(s.batch_sizes),
        "optimizer": list(s.optimizers),
        "schedule": list(s.schedules),
        "depth": list(range(s.depth[0], s.depth[1] + 1)),
        "width": ints(*s.width),
        "activation": list(s.activations),
        "dropout": sorted({float(v) for v in np.linspace(*s.dropout, n)}),
        "channels": ints(*s.channels),
        "kernel": list(s.kernels),
        "augment": list(s.augment),
        "freeze_epochs": list(range(s.freeze_epochs[0], s.freeze_epochs[1] + 1)),
        "backbone_lr_scale": sorted({float(v) for v in np.geomspace(*s.backbone_lr_scale, n)}),
    }


def make_sampler(cfg: SearchConfig) -> optuna.samplers.BaseSampler:
    if cfg.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=cfg.seed, multivariate=True)
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=cfg.seed)
    if cfg.sampler == "grid":
        return optuna.samplers.GridSampler(grid_space(cfg), seed=cfg.seed)
    if cfg.sampler == "cmaes":
        # CMA-ES models numeric parameters only; categorical ones are drawn independently.
        return optuna.samplers.CmaEsSampler(seed=cfg.seed, warn_independent_sampling=False)
    population = cfg.population or max(4, min(20, cfg.n_trials // 3))
    if cfg.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=cfg.seed, population_size=population)
    if cfg.sampler == "genetic":
        # A real-coded GA: with one objective NSGA-II's non-dominated ranking is plain fitness ranking,
        # so its binary tournament and elitist survival are a (mu + lambda) GA. What makes it a
        # different strategy from `nsga2` (uniform crossover) is simulated binary crossover on the
        # numbers (children near their parents, as in real-coded GAs); categoricals cross uniformly.
        from optuna.samplers.nsgaii import SBXCrossover

        with warnings.catch_warnings():  # stable since Optuna 3.0, still labelled experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            crossover = SBXCrossover()
        return optuna.samplers.NSGAIISampler(
            seed=cfg.seed, population_size=population, crossover=crossover, mutation_prob=cfg.mutation_prob
        )
    if cfg.sampler == "greedy":
        from tasks.search.greedy import GreedySampler

        return GreedySampler(seed=cfg.seed, patience=cfg.greedy_patience, step=cfg.greedy_step)
    raise ValueError(f"unknown sampler {cfg.sampler!r}")


def make_pruner(cfg: SearchConfig) -> optuna.pruners.BasePruner:
    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=max(1, cfg.epochs // 4))
    if cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=cfg.epochs)
    if cfg.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1)
    return optuna.pruners.NopPruner()


def suggest(trial: optuna.trial.BaseTrial, cfg: SearchConfig) -> dict:
    """Every parameter is drawn in every trial (channels/kernel are unused by MLPs), which keeps the
    space flat: the grid is an exact product and samplers need no conditional handling."""
    s = cfg.space
    return {
        "family": trial.suggest_categorical("family", s.families),
        "lr": trial.suggest_float("lr", *s.lr, log=True),
        "weight_decay": trial.suggest_categorical("weight_decay", s.weight_decay),
        "batch_size": trial.suggest_categorical("batch_size", s.batch_sizes),
        "optimizer": trial.suggest_categorical("optimizer", s.optimizers),
        "schedule": trial.suggest_categorical("schedule", s.schedules),
        "depth": trial.suggest_int("depth", *s.depth),
        "width": trial.suggest_int("width", *s.width, log=True),
        "activation": trial.suggest_categorical("activation", s.activations),
        "dropout": trial.suggest_float("dropout", *s.dropout),
        "channels": trial.suggest_int("channels", *s.channels, log=True),
        "kernel": trial.suggest_categorical("kernel", s.kernels),
        "augment": trial.suggest_categorical("augment", s.augment),
        "freeze_epochs": trial.suggest_int("freeze_epochs", *s.freeze_epochs),
        "backbone_lr_scale": trial.suggest_float("backbone_lr_scale", *s.backbone_lr_scale, log=True),
        # The user's model is fixed, not searched; carried so the chosen parameters rebuild it.
        **cfg.model.fixed_params(),
    }


def open_study(cfg: SearchConfig, study_name: str, storage: str) -> optuna.Study:
    directions = [DIRECTIONS[o] for o in cfg.objectives]
    kwargs = {"direction": directions[0]} if len(directions) == 1 else {"directions": directions}
    return optuna.create_study(
        study_name=study_name,
        storage=storage_of(storage),
        sampler=make_sampler(cfg),
        pruner=make_pruner(cfg),
        load_if_exists=True,
        **kwargs,
    )


def open_run_study(cfg: SearchConfig, out_dir: Path, study_name: str) -> optuna.Study:
    """The run's study in the configured storage, or in the default file storage under `out_dir`
    (its folder created first; a server database needs no folder here)."""
    if not cfg.storage:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    return open_study(cfg, study_name, resolve_storage(cfg, out_dir))
