"""Search benchmark: best validation accuracy reached after N trials, random vs TPE vs NSGA-II vs greedy vs GA.

    .venv/bin/python bench/search.py [--trials 50] [--seeds 0,1,2] [--epochs 4]

Runs real Optuna studies (the pipeline's own `run_trials`) on the digits task for every sampler and
seed, then prints the mean best-so-far validation accuracy at several trial counts and how many
trials each sampler needed to reach random search's 50-trial best (per seed, then averaged), and at which N
the seed-averaged curve reaches random's averaged final best.
Not a test: it takes minutes and its figures are what it reports.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState

from tasks.data.digits import DataConfig, materialize_digits
from tasks.search.space import SearchConfig
from tasks.search.study import resolve_storage, storage_of
from tasks.search.trials import run_trials

SAMPLERS = ("random", "tpe", "nsga2", "greedy", "genetic")


def best_so_far(study: optuna.Study) -> np.ndarray:
    trials = sorted(study.trials, key=lambda t: t.number)
    values = [t.values[0] if t.state == TrialState.COMPLETE else 0.0 for t in trials]
    return np.maximum.accumulate(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=4, help="training epochs per trial")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench-search-"))
    materialize_digits(DataConfig(), work / "data")

    curves: dict[str, list[np.ndarray]] = {s: [] for s in SAMPLERS}
    for sampler in SAMPLERS:
        for seed in seeds:
            cfg = SearchConfig(sampler=sampler, n_trials=args.trials, epochs=args.epochs, seed=seed)
            out = work / f"{sampler}-{seed}"
            print(f"[bench] {sampler} seed {seed}: {args.trials} trials")
            run_trials(cfg, work / "data", out, f"{sampler}-{seed}")
            study = optuna.load_study(study_name=f"{sampler}-{seed}", storage=storage_of(resolve_storage(cfg, out)))
            curves[sampler].append(best_so_far(study)[: args.trials])

    checkpoints = [n for n in (5, 10, 20, 30, 50, 100) if n <= args.trials]
    print(f"\nbest validation accuracy after N trials (mean ± std over seeds {seeds}, {args.epochs} epochs/trial)")
    print(
        f"{'sampler':<8}"
        + "".join(f"{f'N={n}':>16}" for n in checkpoints)
        + f"{'per-seed N to random best':>28}{'mean-curve N':>14}"
    )
    random_best = [c[-1] for c in curves["random"]]
    random_mean_best = float(np.mean(random_best))
    for sampler in SAMPLERS:
        cells = []
        for n in checkpoints:
            vals = [c[n - 1] for c in curves[sampler]]
            cells.append(f"{np.mean(vals):.4f} ± {np.std(vals):.4f}")
        reach = []
        for curve, target in zip(curves[sampler], random_best, strict=True):
            hit = np.nonzero(curve >= target)[0]
            reach.append(int(hit[0]) + 1 if len(hit) else None)
        shown = [str(r) if r else f">{args.trials}" for r in reach]
        mean = np.mean([r or args.trials + 1 for r in reach])
        reached = f"{mean:.1f} (" + ", ".join(shown) + ")"
        # First N at which the seed-averaged best-so-far reaches random search's averaged final best.
        crossing = np.nonzero(np.mean(curves[sampler], axis=0) >= random_mean_best)[0]
        mean_curve = str(int(crossing[0]) + 1) if len(crossing) else f">{args.trials}"
        print(f"{sampler:<8}" + "".join(f"{c:>16}" for c in cells) + f"{reached:>28}{mean_curve:>14}")


if __name__ == "__main__":
    main()
