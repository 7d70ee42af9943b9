"""The end of a search: read the finished study, pick the final configuration (the Pareto front and the
selection rule for multi-objective studies) and report it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState
from prefect import task

from tasks.search.space import SearchConfig
from tasks.search.study import open_study, resolve_storage, suggest

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class SearchError(RuntimeError):
    """The search produced nothing usable: every trial failed, or nothing meets the selection budget."""


@dataclass(frozen=True)
class SearchResult:
    best_params: dict
    best_values: dict  # objective -> value of the chosen trial
    chosen_trial: int
    completed_trials: int
    pruned_trials: int
    failed_trials: int
    pareto_front: list[dict]  # [{"trial", "values", "params"}] (single objective: the best trial)
    study_name: str
    storage: str
    best_params_path: Path

    def flat(self) -> dict:
        """Scalars for MLflow: counts, chosen trial, its objective values and parameters."""
        return {
            "chosen_trial": self.chosen_trial,
            "completed_trials": self.completed_trials,
            "pruned_trials": self.pruned_trials,
            "failed_trials": self.failed_trials,
            "study_name": self.study_name,
            "storage": self.storage,
            **{f"value_{k}": v for k, v in self.best_values.items()},
            **self.best_params,
        }


def pick_trial(study: optuna.Study, cfg: SearchConfig) -> tuple[optuna.trial.FrozenTrial, list]:
    """(chosen trial, Pareto front). Multi-objective: the selection rule over the front."""
    if len(cfg.objectives) == 1:
        return study.best_trial, [study.best_trial]
    front = sorted(study.best_trials, key=lambda t: -t.values[0])
    feasible = front
    if cfg.selection == "accuracy_under_latency":
        i, budget = cfg.objectives.index("latency"), cfg.latency_budget_ms
        feasible = [t for t in front if t.values[i] <= budget]
    elif cfg.selection == "accuracy_under_size":
        i, budget = cfg.objectives.index("size"), cfg.size_budget_params
        feasible = [t for t in front if t.values[i] <= budget]
    if not feasible:
        rows = "\n".join(
            f"  trial {t.number}: " + ", ".join(f"{o}={v:.4g}" for o, v in zip(cfg.objectives, t.values, strict=True))
            for t in front
        )
        raise SearchError(f"no Pareto-optimal trial meets {cfg.selection} (budget {budget}); the front is:\n{rows}")
    return feasible[0], front


def summarize_search(
    cfg: SearchConfig, out_dir: Path, study_name: str, parent_run_id: str | None = None
) -> SearchResult:
    """Choose the final configuration and report the study (front, importances, plots, trials table)."""
    from tasks.search.report import report_search

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)  # workers elsewhere never wrote here
    storage = resolve_storage(cfg, out_dir)
    study = open_study(cfg, study_name, storage)
    trials = study.get_trials(deepcopy=False)
    count = {s: sum(t.state == s for t in trials) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    if not count[TrialState.COMPLETE]:
        errors = [
            f"trial {t.number}: {t.user_attrs.get('error', 'failed before its objective ran')}"
            for t in trials
            if t.state == TrialState.FAIL
        ][-5:]
        raise SearchError(
            f"search: no trial completed ({count[TrialState.FAIL]} failed, "
            f"{count[TrialState.PRUNED]} pruned); last errors:\n  " + "\n  ".join(errors)
        )
    chosen, front = pick_trial(study, cfg)
    best_params = suggest(optuna.trial.FixedTrial(chosen.params), cfg)
    values = dict(zip(cfg.objectives, chosen.values, strict=True))
    path = out_dir / "best_params.json"
    path.write_text(json.dumps({"params": best_params, "values": values, "trial": chosen.number}, indent=2))
    result = SearchResult(
        best_params,
        values,
        chosen.number,
        count[TrialState.COMPLETE],
        count[TrialState.PRUNED],
        count[TrialState.FAIL],
        [
            {"trial": t.number, "values": dict(zip(cfg.objectives, t.values, strict=True)), "params": t.params}
            for t in front
        ],
        study_name,
        storage,
        path,
    )
    report_search(study, cfg, result, out_dir, parent_run_id)
    print(
        f"[search] chosen trial #{chosen.number} ({cfg.selection}): "
        + ", ".join(f"{k} {v:.4g}" for k, v in values.items())
        + f" {best_params}"
    )
    return result


summarize_search_task = task(name="summarize_search")(summarize_search)
