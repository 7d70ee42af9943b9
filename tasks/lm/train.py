"""The causal-LM fine-tune stage: checks before training, the Optuna search over the LoRA settings (each
trial a nested MLflow run with its curves), the fine-tune itself (`tasks/lm/lora.py`), the adapter logged,
the merged folder handed to the export; and the base model's reference rows of the candidate table."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

import optuna
import torch
from prefect import task

from tasks.core.settings import ConfigError
from tasks.core.stop import interruption
from tasks.core.tracking import log_artifact, log_artifacts, log_metrics, log_params
from tasks.data.corpus import load_corpus, load_tokenizer
from tasks.lm.finetune import FinetuneConfig
from tasks.lm.lora import Windows, merge, pack, target_modules, train_lora
from tasks.release.validate import Report
from tasks.search.trials import TrialRuns, TrialTracking

REFERENCE = "base_"  # candidate-name prefix of the base model's rows in the candidate table


@dataclass(frozen=True)
class FinetuneData:
    train: Windows
    val: Windows


def check_finetune(hf_dir: Path, data_dir: Path, cfg: FinetuneConfig) -> FinetuneData:
    """The packed windows, or one ConfigError naming every reason the fine-tune cannot run (before training)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    problems = []
    with torch.device("meta"):  # the layer names, without the weights
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(hf_dir)))
    try:
        target_modules(skeleton, cfg)
    except ConfigError as err:
        problems.append(str(err))
    tokenizer, corpus = load_tokenizer(hf_dir), load_corpus(data_dir)
    data = FinetuneData(
        pack(tokenizer, corpus["calibration"], cfg.window, cfg.max_windows),
        pack(tokenizer, corpus["validation"], cfg.window, cfg.val_windows),
    )
    for split, part, windows in (("calibration", "training", data.train), ("validation", "validation", data.val)):
        if not len(windows):
            problems.append(
                f"the {split} documents hold fewer than one {part} window of {cfg.window} tokens "
                "(finetune.window): add documents or lower it"
            )
    if 0 < len(data.train) < cfg.processes:
        problems.append(f"{len(data.train)} training windows for {cfg.processes} processes: each rank needs one")
    if problems:
        raise ConfigError(
            f"the fine-tune cannot run ({len(problems)} problem(s)):\n" + "\n".join(f"  - {p}" for p in problems)
        )
    return data


def suggest(trial: optuna.trial.BaseTrial, cfg: FinetuneConfig) -> FinetuneConfig:
    s = cfg.search
    rank = trial.suggest_categorical("rank", s.ranks)
    return cfg.model_copy(
        update={
            "rank": rank,
            "alpha": rank * trial.suggest_categorical("alpha_ratio", s.alpha_ratios),
            "lr": trial.suggest_float("lr", *s.lr, log=True),
            "epochs": trial.suggest_categorical("epochs", s.epochs),
            "target": trial.suggest_categorical("target", s.targets),
            "warmup": trial.suggest_categorical("warmup", s.warmup),
        }
    )


def _tuned(cfg: FinetuneConfig) -> dict:
    return {k: getattr(cfg, k) for k in ("rank", "alpha", "lr", "epochs", "target", "warmup")}


def search_finetune(
    hf_dir: Path, data: FinetuneData, cfg: FinetuneConfig, work: Path, key: str, tracking: TrialTracking | None = None
) -> FinetuneConfig:
    """Run (or resume) the study named by `key` + the config; each trial a nested MLflow run with its loss and
    validation-perplexity curves. Returns the config with the best trial's settings; a trial that diverges is a
    failed trial, a stop request stops the search (finished trials are kept)."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    # n_trials stays out of the name: raising it adds trials to the same study
    settings = cfg.model_dump(mode="json", exclude={"search": {"n_trials"}})
    name = "finetune-" + hashlib.sha256(json.dumps([key, settings], sort_keys=True).encode()).hexdigest()[:16]
    study = optuna.create_study(
        study_name=name,
        storage=f"sqlite:///{work / 'optuna.db'}",
        load_if_exists=True,
        direction="minimize",
        sampler=optuna.samplers.TPESampler(seed=cfg.search.seed),
    )
    runs = TrialRuns(tracking, name, work)

    def objective(trial: optuna.Trial) -> float:
        run_id = None
        try:
            trial_cfg = suggest(trial, cfg)
            run_id = runs.start(trial, _tuned(trial_cfg))
            _, result = train_lora(
                hf_dir,
                data.train,
                data.val,
                trial_cfg,
                on_record=lambda r: runs.log(
                    run_id, {k: v for k, v in r.items() if k not in ("step", "epoch")}, r["step"]
                ),
            )
            runs.log(run_id, {"best_val_perplexity": result.best_perplexity, "train_seconds": result.seconds})
            runs.end(run_id)
            print(
                f"[finetune-search] trial {trial.number}: {_tuned(trial_cfg)} -> validation perplexity "
                f"{result.best_perplexity:.3f} (base {result.base_perplexity:.3f})"
            )
            return result.best_perplexity
        except BaseException as err:  # a stop too: the trial's run ends KILLED, not RUNNING
            stopped = interruption(err)
            trial.set_user_attr("error", f"{type(err).__name__}: {stopped or err}")
            runs.end(run_id, "KILLED" if stopped else "FAILED", err, stopped)
            raise

    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if done:
        print(f"[finetune-search] resuming study {name}: {len(done)}/{cfg.search.n_trials} trials finished")
    if (todo := cfg.search.n_trials - len(done)) > 0:
        study.optimize(objective, n_trials=todo, catch=(FloatingPointError,))
    if not any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials):
        errors = [t.user_attrs.get("error", "?") for t in study.trials][-3:]
        raise RuntimeError(f"fine-tune search: no trial completed; last errors: {errors}")
    best = suggest(optuna.trial.FixedTrial(study.best_trial.params), cfg)
    print(
        f"[finetune-search] best trial {study.best_trial.number}: {_tuned(best)}, validation perplexity "
        f"{study.best_value:.3f}"
    )
    return best


class Finetuned(NamedTuple):
    merged: Path  # the adapter folded into the base weights: a plain Hugging Face folder
    adapter: Path  # the peft LoRA folder on its own


def finetune_lm(
    hf_dir: Path,
    data_dir: Path,
    cfg: FinetuneConfig,
    out: Path,
    search_dir: Path,
    key: str,
    tracking: TrialTracking | None = None,
) -> Finetuned:
    """Fine-tune (searching first when `cfg.search.n_trials`, the study under `search_dir` named by `key`), log
    the adapter and the curves to the pipeline run; returns the merged Hugging Face folder and the adapter's."""
    data = check_finetune(hf_dir, data_dir, cfg)
    out, run_id = Path(out), tracking and tracking.parent_run_id
    print(f"[finetune] {len(data.train)} training / {len(data.val)} validation windows of {cfg.window} tokens")
    if cfg.search.n_trials:
        cfg = search_finetune(hf_dir, data, cfg, search_dir, key, tracking)

    def record(r: dict) -> None:
        if run_id:
            log_metrics(run_id, {f"finetune.{k}": v for k, v in r.items() if k not in ("step", "epoch")}, r["step"])
        if "val_perplexity" in r:
            print(f"[finetune] epoch {r['epoch']} (step {r['step']}): validation perplexity {r['val_perplexity']:.3f}")

    model, result = train_lora(hf_dir, data.train, data.val, cfg, on_record=record)
    adapter = out / "adapter"
    model.save_pretrained(str(adapter))
    merged = merge(model, hf_dir, out / "merged")
    (out / "finetune.json").write_text(json.dumps({"settings": _tuned(cfg), "result": asdict(result)}, indent=1))
    if run_id:
        log_params(run_id, {f"finetune.trained.{k}": v for k, v in _tuned(cfg).items()})  # searched or as set
        log_metrics(
            run_id,
            {
                "finetune.base_val_perplexity": result.base_perplexity,
                "finetune.best_val_perplexity": result.best_perplexity,
                "finetune.best_epoch": result.best_epoch,
                "finetune.seconds": result.seconds,
            },
        )
        log_artifacts(run_id, adapter, "finetune/adapter")
        log_artifact(run_id, out / "finetune.json", "finetune")
    print(
        f"[finetune] validation perplexity {result.base_perplexity:.3f} -> {result.best_perplexity:.3f} (best epoch "
        f"{result.best_epoch}/{result.epochs_run}, {result.seconds:.0f}s on {result.processes} process(es), "
        f"{result.parallel}); merged into {merged}"
    )
    return Finetuned(merged, adapter)


def mark_reference(reports: list[Report]) -> list[Report]:
    """The base model's rows stay in the table for comparison and are never chosen."""
    return [
        replace(r, failed_gates=[*r.failed_gates, "reference: the base model before fine-tuning"])
        if r.name.startswith(REFERENCE)
        else r
        for r in reports
    ]


finetune_lm_task = task(name="finetune_lm")(finetune_lm)
