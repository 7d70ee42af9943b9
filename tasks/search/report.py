"""Study report: the Pareto (or optimisation-history) plot, parameter importances and the trials
table, written next to the study and logged to the pipeline's MLflow run."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import optuna
from optuna.trial import TrialState

from tasks.core import tracking
from tasks.search.space import SearchConfig

AXIS = {"latency": "ONNX Runtime CPU p50 latency, batch 1 (ms)", "size": "parameters"}


def plot_study(study: optuna.Study, cfg: SearchConfig, chosen: int, path: Path) -> Path:
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if len(cfg.objectives) > 1:
        x_obj: Literal["latency", "size"] = "latency" if "latency" in cfg.objectives else "size"
        xi = cfg.objectives.index(x_obj)
        front = {t.number for t in study.best_trials}
        ax.scatter(
            [t.values[xi] for t in complete], [t.values[0] * 100 for t in complete], c="lightgray", label="trials"
        )
        pts = sorted((t.values[xi], t.values[0] * 100) for t in complete if t.number in front)
        ax.plot(*zip(*pts, strict=True), "o-", color="tab:blue", label="Pareto front")
        best = next(t for t in complete if t.number == chosen)
        ax.scatter([best.values[xi]], [best.values[0] * 100], marker="*", s=250, color="tab:red", label="chosen")
        ax.set_xlabel(AXIS[x_obj])
        if x_obj == "size":
            ax.set_xscale("log")
        ax.set_title(f"Search: accuracy vs {x_obj} ({cfg.sampler}, {len(complete)} trials)")
    else:
        numbers = [t.number for t in complete]
        values = [t.values[0] * 100 for t in complete]  # `value`, typed as possibly unset
        running = [max(values[: i + 1]) for i in range(len(values))]
        ax.scatter(numbers, values, color="lightgray", label="trial")
        ax.step(numbers, running, where="post", color="tab:blue", label="best so far")
        ax.set_xlabel("trial")
        ax.set_title(f"Search history ({cfg.sampler}, pruner {cfg.pruner})")
    ax.set_ylabel("validation accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def param_importances(study: optuna.Study) -> dict[str, float]:
    """Importance of each parameter for validation accuracy; empty when the study is too small."""
    try:
        # The default evaluator (PED-ANOVA) ranks parameters by how they drive the target *down*, and
        # warns about that whenever a target is given, even one negated for it as here.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="PedAnovaImportanceEvaluator")
            return optuna.importance.get_param_importances(study, target=lambda t: -t.values[0])
    except (RuntimeError, ValueError, ZeroDivisionError):
        return {}


def report_search(study: optuna.Study, cfg: SearchConfig, result, out_dir: Path, parent_run_id: str | None) -> None:
    out_dir = Path(out_dir)
    plot = plot_study(
        study, cfg, result.chosen_trial, out_dir / ("pareto.png" if len(cfg.objectives) > 1 else "history.png")
    )
    importances = param_importances(study)
    trials_csv = out_dir / "trials.csv"
    study.trials_dataframe().to_csv(trials_csv, index=False)
    summary = {
        "study": result.study_name,
        "sampler": cfg.sampler,
        "pruner": cfg.pruner,
        "objectives": cfg.objectives,
        "selection": cfg.selection,
        "chosen_trial": result.chosen_trial,
        "values": result.best_values,
        "completed": result.completed_trials,
        "pruned": result.pruned_trials,
        "failed": result.failed_trials,
        "pareto_front": result.pareto_front,
        "importances": importances,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    if importances:
        print("[search] parameter importance: " + ", ".join(f"{k} {v:.2f}" for k, v in importances.items()))
    if parent_run_id:
        for path in (plot, trials_csv, out_dir / "summary.json"):
            tracking.log_artifact(parent_run_id, path, "search")
        tracking.log_metrics(parent_run_id, {f"search.importance.{k}": v for k, v in importances.items()})
