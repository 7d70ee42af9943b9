"""The candidate search: Optuna over the weight-only space (bits, algorithm, block size, symmetry,
accuracy level, lm_head precision, INT8 layers), each trial quantized, scored on validation perplexity and
timed decoding; the Pareto front (perplexity down, decode speed up) yields the candidates."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Literal

import optuna
from prefect import task
from pydantic import Field, model_validator

from tasks.compress.base import Candidate
from tasks.core.settings import Section
from tasks.lm.adapter import Adapted
from tasks.lm.evaluate import ONNX_FILE, LMEval
from tasks.lm.quantize import LMAlgorithm, LMRecipe, quantize_lm
from tasks.lm.release import LMValidateConfig
from tasks.release.guard import sha256_of


class LMSearchConfig(Section):
    """Optuna over the weight-only space, scored on validation perplexity and measured decode speed."""

    n_trials: int = Field(12, ge=0, description="Trials (0: only the fixed candidates).")
    seed: int = Field(0, description="Sampler seed.")
    bits: list[Literal[4, 8]] = Field([4, 8], min_length=1, description="Weight bits to try.")
    algorithms: list[LMAlgorithm] = Field(["rtn", "k_quant", "hqq"], min_length=1, description="Algorithms to try.")
    block_sizes: list[Literal[32, 64, 128]] = Field([32, 64, 128], min_length=1, description="Block sizes to try.")
    symmetric: list[bool] = Field([True, False], min_length=1, description="Symmetric and/or asymmetric blocks.")
    accuracy_levels: list[Literal[0, 4]] = Field([0, 4], min_length=1, description="Activation precisions to try.")
    lm_head: list[Literal["fp32", "int8", "int4"]] = Field(
        ["int8", "int4"], min_length=1, description="lm_head precisions to try."
    )
    int8_layers: list[int] = Field(
        [0, 2, 4], min_length=1, description="Numbers of most-sensitive layers kept at INT8."
    )
    trial_windows: int = Field(
        4,
        ge=1,
        description="Windows scored per trial (validation) and per layer in the "
        "sensitivity measurement (calibration); the gates score all data.max_windows.",
    )
    keep: int = Field(
        3,
        ge=1,
        description="Pareto-front trials that become candidates (fastest first among those "
        "within the perplexity gate).",
    )


class LMCompressConfig(Section):
    candidates: dict[str, LMRecipe] = Field(
        # minmax at accuracy_level 4 was SmolLM2's fastest passing INT4 (bench/llm.py), int8 the safe choice; int4_rtn
        # (the model builder's int4 rule, INT8 lm_head) shows what plain INT4 costs
        default_factory=lambda: {
            "int4_minmax": LMRecipe(algorithm="minmax", accuracy_level=4),
            "int4_rtn": LMRecipe(),
            "int8": LMRecipe(bits=8),
        },
        description="Fixed candidates (name -> recipe) measured beside the searched ones.",
    )
    search: LMSearchConfig = Field(default_factory=LMSearchConfig, description="The candidate search.")

    @property
    def uses_sensitivity(self) -> bool:
        """Whether any recipe keeps sensitive layers at INT8 (the per-layer measurement is then needed)."""
        return any(r.int8_layers for r in self.candidates.values()) or (
            self.search.n_trials > 0 and any(self.search.int8_layers)
        )

    @model_validator(mode="after")
    def _names_free(self) -> LMCompressConfig:
        if bad := [n for n in self.candidates if n == "baseline" or n.startswith(("trial_", "base_"))]:
            raise ValueError(f"candidate names {bad}: 'baseline', 'trial_*' and 'base_*' are the pipeline's own")
        space = self.search
        if "minmax" in space.algorithms and (space.bits, space.block_sizes) != ([4], [32]):
            raise ValueError("search.algorithms with minmax needs search.bits [4] and search.block_sizes [32]")
        return self


def suggest(trial: optuna.Trial, space: LMSearchConfig) -> LMRecipe:
    bits = trial.suggest_categorical("bits", space.bits)
    return LMRecipe(
        bits=bits,
        algorithm=trial.suggest_categorical("algorithm", space.algorithms),
        block_size=trial.suggest_categorical("block_size", space.block_sizes),
        symmetric=trial.suggest_categorical("symmetric", space.symmetric),
        accuracy_level=trial.suggest_categorical("accuracy_level", space.accuracy_levels),
        lm_head=trial.suggest_categorical("lm_head", space.lm_head),
        int8_layers=trial.suggest_categorical("int8_layers", space.int8_layers),
    )


def search_lm(
    fp32_dir: Path,
    evaluator: LMEval,
    space: LMSearchConfig,
    timing: LMValidateConfig,
    max_length: int,
    sensitive: list[int],
    max_ppl_increase_pct: float,
    work: Path,
    key: str,
) -> list[tuple[str, LMRecipe]]:
    """Run (or resume) the study named by `key` + the space; return up to `space.keep` Pareto-front recipes,
    fastest first among those within `max_ppl_increase_pct` of FP32 on the trial windows (the most accurate
    ones when none is)."""
    if space.n_trials == 0:
        return []
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    name = (
        "lm-"
        + hashlib.sha256(
            json.dumps([key, space.model_dump(mode="json"), sensitive], sort_keys=True).encode()
        ).hexdigest()[:16]
    )
    study = optuna.create_study(
        study_name=name,
        storage=f"sqlite:///{work / 'optuna.db'}",
        load_if_exists=True,
        directions=["minimize", "maximize"],
        sampler=optuna.samplers.NSGAIISampler(seed=space.seed),
    )
    base = evaluator.quality(fp32_dir, space.trial_windows)["perplexity"]

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        recipe = suggest(trial, space)
        folder = work / f"trial_{trial.number}"
        trial.set_user_attr("recipe", recipe.model_dump())
        try:
            quantize_lm(fp32_dir, recipe, folder, sensitive)
            # Settings a recipe does not read (symmetry for hqq and k_quant, accuracy level for 8 bits, ...) make
            # the same model again: its scores are reused, not measured twice.
            trial.set_user_attr("weights", _digest(folder))
            if same := _same_model(study, trial):
                print(f"[lm-search] trial {trial.number}: the same model as trial {same.number}; its scores reused")
                trial.set_user_attr("top1", same.user_attrs["top1"])
                return same.values[0], same.values[1]
            quality = evaluator.quality(folder, space.trial_windows)
            speed = evaluator.timings({"t": folder}, timing.prompt_lengths[:1], timing.new_tokens, max_length, 1)["t"]
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        tok_s = next(iter(speed["prompts"].values()))["decode_tok_s"]
        trial.set_user_attr("top1", quality["top1"])
        print(
            f"[lm-search] trial {trial.number}: {recipe.model_dump()} -> perplexity {quality['perplexity']:.3f} "
            f"({(quality['perplexity'] / base - 1) * 100:+.1f}%), top-1 {quality['top1']:.3f}, {tok_s:.0f} tok/s"
        )
        return quality["perplexity"], tok_s

    todo = space.n_trials - len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE])
    if todo > 0:
        # a recipe the quantizer cannot write is a failed trial (Optuna records why), not a failed run
        study.optimize(objective, n_trials=todo, catch=(ValueError,))
    front: list[optuna.trial.FrozenTrial] = []
    for t in study.best_trials:  # each model once
        if t.state == optuna.trial.TrialState.COMPLETE and not any(_twins(t, f) for f in front):
            front.append(t)
    within = [t for t in front if (t.values[0] / base - 1) * 100 <= max_ppl_increase_pct]
    ranked = sorted(within, key=lambda t: -t.values[1]) or sorted(front, key=lambda t: t.values[0])
    return [(f"trial_{t.number}", LMRecipe(**t.user_attrs["recipe"])) for t in ranked[: space.keep]]


def _digest(folder: Path) -> str:
    """The quantized model's files, hashed: two recipes that write the same model have the same digest."""
    files = sorted(p for p in folder.iterdir() if p.name.startswith(ONNX_FILE))
    return hashlib.sha256("".join(sha256_of(p) for p in files).encode()).hexdigest()


def _twins(a: optuna.trial.FrozenTrial | optuna.Trial, b: optuna.trial.FrozenTrial) -> bool:
    """Whether two trials wrote the same model (a trial from before digests were kept has no twin)."""
    return a.user_attrs.get("weights") is not None and a.user_attrs.get("weights") == b.user_attrs.get("weights")


def _same_model(study: optuna.Study, trial: optuna.Trial) -> optuna.trial.FrozenTrial | None:
    """An earlier finished trial that wrote the same model as `trial`, if any."""
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return next((t for t in done if t.number < trial.number and _twins(trial, t)), None)


def make_candidate(
    name: str, recipe: LMRecipe, fp32_dir: Path, out: Path, sensitive: list[int], adapted: Adapted | None = None
) -> Candidate:
    """The recipe applied to `fp32_dir` (the merged model's, for a fine-tuned run); `adapter: separate` applies it
    to the base model's weights of `adapted` instead, its LoRA update kept beside them."""
    source, adapter = fp32_dir, None
    if recipe.adapter == "separate":
        if adapted is None:
            raise ValueError(f"candidate {name}: adapter 'separate' needs a fine-tuned model (finetune.enabled)")
        source, adapter = adapted.base_fp32, adapted.adapter
    folder = quantize_lm(source, recipe, Path(out) / name, sensitive, adapter)
    return Candidate(name, folder / ONNX_FILE, folder, None, recipe.model_dump() | {"sensitive_layers": sensitive})


search_lm_task = task(name="search_lm")(search_lm)
make_candidate_task = task(name="quantize_lm", task_run_name="quantize-{name}")(make_candidate)
