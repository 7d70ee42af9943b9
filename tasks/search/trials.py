"""Hyperparameter and architecture search on a persistent Optuna study.

The study lives in shared storage (SQLite by default) under a name derived from the data version
and the search config, so an interrupted run resumes where it stopped, a changed config starts a
new study, and several workers (Prefect tasks, threads or processes) can fill one study together.

`run_trials` is the worker; `summarize_search` (tasks.search.summary) reads the finished study, picks the final
configuration (Pareto front + selection rule for multi-objective studies) and reports it.
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import optuna
import torch
from optuna.trial import TrialState
from prefect import task

from tasks.core import tracking
from tasks.core.settings import ConfigError
from tasks.core.stop import interruption
from tasks.data import load_splits
from tasks.models import (
    FAMILIES,
    ModelConfig,
    arch_from_params,
    build_model,
    count_params,
    vocab_of,
)
from tasks.search.fetch import DataRef, resolve_data
from tasks.search.space import SearchConfig
from tasks.search.study import (
    DIRECTIONS,
    open_run_study,
    resolve_storage,
    storage_of,
    suggest,
)
from tasks.search.summary import FINISHED, SearchResult, summarize_search
from tasks.train.loop import TrainParams, fit

optuna.logging.set_verbosity(optuna.logging.WARNING)  # the per-trial progress line says it better


def measure_trial_latency(model: torch.nn.Module, x: np.ndarray) -> float:
    """p50 batch-1 latency (ms) of the model exported to ONNX and run on ORT CPU: the real target."""
    from tasks.onnx.export import export_onnx
    from tasks.onnx.runtime import make_session, measure_speeds

    with tempfile.TemporaryDirectory() as tmp:
        exported = export_onnx(model, Path(tmp) / "trial.onnx", x[:64])
        timing = measure_speeds(
            {"m": make_session(exported.path)}, x, warmup=20, latency_runs=200, batch=64, batch_runs=10, rounds=1
        )
    return timing["m"].latency_p50_ms


@dataclass(frozen=True)
class TrialTracking:
    """Where a search worker logs its trials, handed over explicitly: a worker in another process or
    on another machine has none of the driver's MLflow settings and would otherwise log into a
    stray store of its own."""

    uri: str  # the MLflow tracking URI
    experiment_id: str
    parent_run_id: str


class TrialRuns:
    """One nested MLflow run per trial under the pipeline run; silent without tracking (benchmarks)."""

    def __init__(self, tracking: TrialTracking | None, study_name: str, data_dir: Path):
        self.tracking, self.study = tracking, study_name
        self.where = {
            "modelforge.host": socket.gethostname(),
            "modelforge.pid": str(os.getpid()),
            "modelforge.data_dir": str(data_dir),
        }
        if tracking:
            import mlflow

            mlflow.set_tracking_uri(tracking.uri)

    def start(self, trial: optuna.Trial, params: dict) -> str | None:
        if not self.tracking:
            return None
        run_id = tracking.start_run(
            self.tracking.experiment_id,
            f"trial-{trial.number}",
            self.tracking.parent_run_id,
            {"optuna.trial": trial.number, "optuna.study": self.study, **self.where},
        )
        tracking.log_params(run_id, params)
        return run_id

    def log(self, run_id: str | None, metrics: dict, step: int = 0) -> None:
        if run_id:
            tracking.log_metrics(run_id, metrics, step)

    def end(
        self, run_id: str | None, status: str = "FINISHED", err: BaseException | None = None, reason: str | None = None
    ) -> None:
        if run_id:
            tracking.fail_run(run_id, err, status, reason) if err is not None else tracking.end_run(run_id, status)


class _Budget:
    """Stop a worker once the shared study holds `n_trials` finished trials (resume-aware and shared by
    all workers), or when trials started by this run failed `n_trials` times (a broken setup must not
    loop forever). Failures of earlier runs do not count: they would end a fixed setup's study for good."""

    def __init__(self, n_trials: int, since: datetime):
        self.n_trials, self.since = n_trials, since

    def done(self, study: optuna.Study) -> bool:
        trials = study.get_trials(deepcopy=False)
        return (
            sum(t.state in FINISHED for t in trials) >= self.n_trials
            or sum(
                t.state == TrialState.FAIL and t.datetime_start is not None and t.datetime_start >= self.since
                for t in trials
            )
            >= self.n_trials
        )

    def __call__(self, study: optuna.Study, _trial: optuna.trial.FrozenTrial) -> None:
        if self.done(study):
            study.stop()


def cv_folds(splits, k: int, seed: int) -> list[tuple[tuple, tuple]]:
    """k stratified (train, val) folds of train + val; none for k = 1 (trials use the val split)."""
    if k <= 1:
        return []
    from sklearn.model_selection import StratifiedKFold

    x, y = (np.concatenate([a, b]) for a, b in zip(splits.train, splits.val, strict=True))
    return [
        ((x[tr], y[tr]), (x[va], y[va]))
        for tr, va in StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y)
    ]


def _cross_validate(
    params: dict,
    folds: list,
    tp: TrainParams,
    num_classes: int,
    input_shape: tuple,
    vocab: int,
    seed: int,
    log: Callable[[dict], None],
) -> tuple[float, float]:
    """(best epoch of the mean fold-accuracy curve, seconds): every fold trains the same way from the
    same seed; the epochs are compared across folds, so one count fits them all, as refit needs."""
    curves, seconds = [], 0.0
    for train, val in folds:
        torch.manual_seed(seed)
        result = fit(build_model(arch_from_params(params, num_classes, input_shape, vocab)), train, val, tp)
        curves.append([r["val_accuracy"] for r in result.history])
        seconds += result.seconds
    mean = np.mean(curves, axis=0)
    for epoch, value in enumerate(mean, 1):
        log({"epoch": epoch, "val_accuracy": float(value)})  # the curve the trial is scored on
    return float(mean.max()), seconds


def run_trials(
    cfg: SearchConfig,
    data: Path | DataRef,
    out_dir: Path,
    study_name: str,
    tracking: TrialTracking | None = None,
    worker: int = 0,
) -> int:
    """Run trials on the shared study until it holds `cfg.n_trials` finished ones; returns how many
    this worker ran. Safe to call from several workers at once, in any process or machine: the data
    comes by reference, the tracking store and the study storage by URL (`out_dir` holds only the
    default file storage, which the config refuses for workers on other machines)."""
    data_dir = resolve_data(data)
    splits = load_splits(data_dir)
    input_shape = tuple(splits.manifest["input_shape"])
    study = open_run_study(cfg, out_dir, study_name)
    budget = _Budget(cfg.n_trials, datetime.now())
    if budget.done(study):
        return 0
    before = sum(t.state in FINISHED for t in study.get_trials(deepcopy=False))
    if before and worker == 0:
        print(f"[search] resuming study {study_name}: {before}/{cfg.n_trials} trials already finished")
    runs = TrialRuns(tracking, study_name, data_dir)
    folds = cv_folds(splits, cfg.cv_folds, cfg.seed)
    multi = len(cfg.objectives) > 1
    started, ran = time.perf_counter(), [0]
    lock = threading.Lock()

    def objective(trial: optuna.Trial):
        run_id = None
        try:  # everything, MLflow included: a failure anywhere is recorded on the trial with its real message
            params = suggest(trial, cfg)
            run_id = runs.start(trial, params)
            torch.manual_seed(cfg.seed + trial.number)
            model = build_model(arch_from_params(params, splits.num_classes, input_shape, vocab_of(splits.manifest)))
            tp = TrainParams.from_search(params, cfg.epochs, patience=cfg.epochs, seed=cfg.seed)

            def on_epoch(r: dict) -> None:
                runs.log(run_id, {"train_loss": r["train_loss"], "val_accuracy": r["val_accuracy"]}, r["epoch"])
                if not multi:
                    trial.report(r["val_accuracy"], r["epoch"])
                    if trial.should_prune():
                        raise optuna.TrialPruned(f"val accuracy {r['val_accuracy']:.4f} at epoch {r['epoch']}")

            if folds:
                accuracy_, seconds = _cross_validate(
                    params,
                    folds,
                    tp,
                    splits.num_classes,
                    input_shape,
                    vocab_of(splits.manifest),
                    cfg.seed + trial.number,
                    lambda r: runs.log(run_id, {"val_accuracy": r["val_accuracy"]}, r["epoch"]),
                )
            else:
                result = fit(model, splits.train, splits.val, tp, on_epoch=on_epoch)
                accuracy_, seconds = result.best_val_accuracy, result.seconds
            values = {"accuracy": accuracy_, "size": float(count_params(model))}
            if "latency" in cfg.objectives:
                values["latency"] = measure_trial_latency(model, splits.val[0])
            runs.log(run_id, {f"objective_{k}": v for k, v in values.items()} | {"train_seconds": seconds})
            runs.end(run_id)
            out = [values[o] for o in cfg.objectives]
            return out if multi else out[0]
        except optuna.TrialPruned:
            runs.end(run_id, "KILLED")
            raise
        except BaseException as err:  # a stop too: the trial's run ends KILLED, not RUNNING
            stopped = interruption(err)
            trial.set_user_attr("error", f"{type(err).__name__}: {stopped or err}")
            runs.end(run_id, "KILLED" if stopped else "FAILED", err, stopped)
            raise

    def progress(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        with lock:
            ran[0] += 1
            trials = study.get_trials(deepcopy=False)
            finished = sum(t.state in FINISHED for t in trials)
            rate = (time.perf_counter() - started) / ran[0] * (1 if cfg.workers == 1 else 1 / cfg.workers)
            eta = rate * max(cfg.n_trials - finished, 0)
            if trial.state == TrialState.COMPLETE:
                value = " / ".join(f"{v:.4g}" for v in trial.values)
            else:
                value = trial.state.name + (f" ({trial.user_attrs['error']})" if "error" in trial.user_attrs else "")
            complete = [t for t in trials if t.state == TrialState.COMPLETE]
            best = f"{max(t.values[0] for t in complete):.4f}" if complete else "n/a"
            print(
                f"[search] trial {min(finished, cfg.n_trials)}/{cfg.n_trials} (#{trial.number}, worker {worker}): "
                f"{value}  best accuracy {best}  ETA {eta:.0f}s"
            )

    # catch=Exception: a crashing trial is recorded as FAIL with its error and the study goes on.
    study.optimize(objective, n_trials=None, catch=(Exception,), callbacks=[budget, progress])
    return ran[0]


def search_model(
    cfg: SearchConfig, data_dir: Path, out_dir: Path, study_name: str, tracking: TrialTracking | None = None
) -> SearchResult:
    """Single-worker search: run the missing trials, then summarize."""
    run_trials(cfg, data_dir, out_dir, study_name, tracking)
    return summarize_search(cfg, out_dir, study_name, tracking.parent_run_id if tracking else None)


def fit_search_to_data(
    cfg: SearchConfig, input_shape: tuple[int, ...], text: bool = False, model: ModelConfig | None = None
) -> SearchConfig:
    """The search space fitted to the data and the model. A user's module (`model.spec`) is the only
    family, with nothing architectural left to search: the trials tune its training. Otherwise the
    families that cannot take the data's samples leave: a CNN or ResNet needs C x H x W images, so a
    table's feature vectors leave only the MLP; token ids (`text`) take the text family only.
    Nothing left is a ConfigError."""
    if model is not None and model.family:
        space = cfg.space.model_copy(
            update={
                "families": [model.family],
                "depth": (1, 1),
                "width": (cfg.space.width[0],) * 2,
                "channels": (cfg.space.channels[0],) * 2,
                "kernels": cfg.space.kernels[:1],
                "activations": cfg.space.activations[:1],
                "dropout": (0.0, 0.0),
            }
        )
        print(
            f"[search] model {model.spec or model.pretrained}"
            + (f" from {model.weights}" if model.weights else "")
            + ": searching its training only"
        )
        return cfg.model_copy(update={"space": space, "model": model})
    images = len(input_shape) == 3
    families = [
        f for f in cfg.space.families if FAMILIES[f].builtin and FAMILIES[f].images <= images and (f == "text") == text
    ]
    if not families:
        raise ConfigError(
            f"search.space.families is {cfg.space.families}, but the data's samples have shape "
            f"{list(input_shape)}"
            + (
                ": text data needs the text family"
                if text
                else ": a cnn or resnet needs [channels, height, width]; add mlp"
            )
        )
    if families != cfg.space.families:
        print(
            f"[search] samples of shape {list(input_shape)}: searching {families} only (the others do not fit "
            "this data)"
        )
    return cfg.model_copy(update={"space": cfg.space.model_copy(update={"families": families})})


def _same_search(a: str, b: str) -> bool:
    """Study names are experiment-datamd5-searchhash: the same experiment and search config on
    another data version."""
    (exp_a, md5_a, hash_a), (exp_b, md5_b, hash_b) = a.rsplit("-", 2), b.rsplit("-", 2)
    return exp_a == exp_b and hash_a == hash_b and md5_a != md5_b


def prepare_study(cfg: SearchConfig, out_dir: Path, study_name: str) -> int:
    """Create the storage's tables and the study once, here, before the workers start: workers that all
    find a fresh database empty race to create its schema (`duplicate key ... alembic_version`).

    A new study on a new data version warm-starts: the `cfg.warm_start` best trials of the latest
    study with the same search config on an earlier version are queued first, so new data costs
    a refinement, not a search from zero. Returns how many trials were queued."""
    study = open_run_study(cfg, out_dir, study_name)
    if not cfg.warm_start or study.get_trials(deepcopy=False):
        return 0
    storage = storage_of(resolve_storage(cfg, out_dir))
    earlier = [
        s
        for s in optuna.get_all_study_summaries(storage, include_best_trial=False)
        if s.study_name.count("-") >= 2 and _same_search(s.study_name, study_name) and s.n_trials
    ]
    if not earlier:
        return 0
    latest = max(earlier, key=lambda s: s.datetime_start or datetime.min)
    done = optuna.load_study(study_name=latest.study_name, storage=storage).get_trials(
        deepcopy=False, states=(TrialState.COMPLETE,)
    )
    sign = -1 if DIRECTIONS[cfg.objectives[0]] == "maximize" else 1
    best = sorted(done, key=lambda t: sign * t.values[0])[: cfg.warm_start]
    for trial in best:
        study.enqueue_trial(
            trial.params, user_attrs={"warm_start_from": f"{latest.study_name}#{trial.number}"}, skip_if_exists=True
        )
    print(f"[search] warm start: queued the {len(best)} best trials of {latest.study_name} (earlier data version)")
    return len(best)


def watch_workers(
    futures: list, cfg: SearchConfig, out_dir: Path, study_name: str, progress: bool, every_s: float = 10.0
) -> list[int]:
    """Wait for the search workers and return how many trials each ran; the first failed worker
    raises its own exception. With `progress` (workers in other processes, whose prints stay on
    their machines) the study's progress is printed here as it grows."""
    from prefect.futures import wait

    started, since, seen = time.perf_counter(), datetime.now(), -1
    study = open_run_study(cfg, out_dir, study_name) if progress else None
    while progress:
        done, pending = wait(futures, timeout=every_s)
        if not pending or any(f.state.is_failed() or f.state.is_crashed() for f in done):
            break
        assert study is not None  # opened above whenever progress is shown
        trials = study.get_trials(deepcopy=False)  # read from the storage each time: the workers' progress
        finished = sum(t.state in FINISHED for t in trials)
        if finished != seen:
            seen = finished
            best = [t.values[0] for t in trials if t.state == TrialState.COMPLETE]
            failed = [
                t for t in trials if t.state == TrialState.FAIL and t.datetime_start and t.datetime_start >= since
            ]
            print(
                f"[search] {min(finished, cfg.n_trials)}/{cfg.n_trials} trials finished on {len(futures)} "
                f"worker(s) after {time.perf_counter() - started:.0f}s; best accuracy "
                + (f"{max(best):.4f}" if best else "n/a")
                + (f"; {len(failed)} failed, last: {failed[-1].user_attrs.get('error', '?')}" if failed else "")
            )
    return [f.result() for f in futures]


prepare_study_task = task(name="prepare_study")(prepare_study)
run_trials_task = task(name="run_trials", task_run_name="search-worker-{worker}")(run_trials)
