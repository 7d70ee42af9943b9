"""Hyperparameter and architecture search with a persistent, resumable Optuna study.

The study lives in SQLite (by default) under a name derived from the data version and the search
config, so an interrupted run resumes where it stopped and a changed config starts a new study.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from prefect import task

from tasks import track_run
from tasks.build_model import Arch, build_model, count_params
from tasks.config import SearchConfig
from tasks.train_model import TrainParams, fit
from tasks.version_data import load_splits

optuna.logging.set_verbosity(optuna.logging.WARNING)  # the per-trial progress line below says it better


@dataclass(frozen=True)
class SearchResult:
    best_params: dict
    best_value: float
    completed_trials: int
    failed_trials: int
    study_name: str
    storage: str
    best_params_path: Path


def make_sampler(cfg: SearchConfig) -> optuna.samplers.BaseSampler:
    if cfg.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=cfg.seed)
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=cfg.seed)
    raise ValueError(f"unknown sampler {cfg.sampler!r}")


def suggest(trial: optuna.Trial, cfg: SearchConfig) -> dict:
    s = cfg.space
    params = {
        "family": trial.suggest_categorical("family", s.families),
        "lr": trial.suggest_float("lr", *s.lr, log=True),
        "optimizer": trial.suggest_categorical("optimizer", s.optimizers),
        "depth": trial.suggest_int("depth", *s.depth),
        "width": trial.suggest_int("width", *s.width, log=True),
    }
    # Channels only matter for conv nets; an MLP trial records the lower bound so every trial has the key.
    params["channels"] = (
        trial.suggest_int("channels", *s.channels, log=True) if params["family"] == "cnn" else s.channels[0]
    )
    return params


def search_model(
    cfg: SearchConfig, data_dir: Path, out_dir: Path, study_name: str, experiment_id: str, parent_run_id: str
) -> SearchResult:
    splits = load_splits(data_dir)
    input_shape = tuple(splits.manifest["input_shape"])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    storage = cfg.storage or f"sqlite:///{(out_dir / 'optuna.db').resolve()}"
    study = optuna.create_study(
        study_name=study_name, storage=storage, sampler=make_sampler(cfg), direction="maximize", load_if_exists=True
    )
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    remaining = cfg.n_trials - len(done)
    if done:
        print(f"[search] resuming study {study_name}: {len(done)} trials already complete, {max(remaining, 0)} to run")
    started = time.perf_counter()
    errors: list[str] = []

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, cfg)
        run_id = track_run.start_run(experiment_id, f"trial-{trial.number}", parent_run_id,
                                     {"optuna.trial": trial.number, "optuna.study": study_name})
        track_run.log_params(run_id, params)
        try:
            torch.manual_seed(cfg.seed + trial.number)
            arch = Arch.from_search(params["family"], params["depth"], params["width"], params["channels"],
                                    splits.num_classes, input_shape)
            model = build_model(arch)
            tp = TrainParams(params["lr"], params["optimizer"], cfg.epochs, patience=cfg.epochs, seed=cfg.seed)
            result = fit(model, splits.train, splits.val, tp,
                         on_epoch=lambda r: track_run.log_metrics(
                             run_id, {"train_loss": r["train_loss"], "val_accuracy": r["val_accuracy"]}, r["epoch"]))
            track_run.log_metrics(run_id, {"objective_val_accuracy": result.best_val_accuracy,
                                           "params_count": count_params(model), "train_seconds": result.seconds})
            track_run.end_run(run_id)
            return result.best_val_accuracy
        except Exception as err:
            errors.append(f"trial {trial.number}: {type(err).__name__}: {err}")
            track_run.fail_run(run_id, err)
            raise

    first_new = len(study.trials)  # trial numbers of this session start here

    def progress(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        ran = trial.number - first_new + 1
        eta = (time.perf_counter() - started) / ran * max(remaining - ran, 0)
        complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        best = f"{study.best_value:.4f}" if complete else "n/a"
        value = f"{trial.value:.4f}" if trial.value is not None else trial.state.name
        print(f"[search] trial {ran}/{remaining} (#{trial.number}): {value}  best {best}  ETA {eta:.0f}s")

    if remaining > 0:
        # catch=Exception: a crashing trial is recorded as FAIL with its error and the study goes on.
        study.optimize(objective, n_trials=remaining, catch=(Exception,), callbacks=[progress])
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    if not complete:
        raise RuntimeError(f"search: all {len(failed)} trials failed:\n" + "\n".join(errors[-5:]))
    best = study.best_trial
    best_params = suggest(optuna.trial.FixedTrial(best.params), cfg)
    path = out_dir / "best_params.json"
    path.write_text(json.dumps({"params": best_params, "value": best.value, "trial": best.number}, indent=2))
    print(f"[search] best trial #{best.number}: val_acc {best.value:.4f} {best_params}")
    return SearchResult(best_params, float(best.value), len(complete), len(failed), study_name, storage, path)


search_model_task = task(search_model, name="search_model")
