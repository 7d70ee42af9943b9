"""Greedy search as an Optuna sampler: hill climbing by coordinate moves, with random restarts.

Each trial copies the incumbent (the best trial of the current climb) and changes exactly one
parameter: a categorical to another choice, a number by a Gaussian step (in log space for log
ranges) of `step` times its range. A better result becomes the incumbent; after `patience` trials
without improvement the climb restarts from a random point. The plan is replayed from the stored
trials every time, so a resumed study, or several workers on one study, continue the same climb.
Multi-objective studies climb on the first objective.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import FrozenTrial, TrialState


class GreedySampler(optuna.samplers.BaseSampler):
    def __init__(self, seed: int | None = None, n_startup_trials: int = 4, patience: int = 8, step: float = 0.25):
        self._rng = np.random.RandomState(seed)
        self._random = optuna.samplers.RandomSampler(seed=seed)
        self.n_startup_trials, self.patience, self.step = n_startup_trials, patience, step
        self._moves: dict[int, tuple[dict, dict, str]] = {}  # trial id -> (incumbent params, distributions, move)
        self._lock = threading.Lock()

    def reseed_rng(self) -> None:
        self._rng.seed()
        self._random.reseed_rng()

    def infer_relative_search_space(self, study, trial) -> dict[str, BaseDistribution]:
        return {}

    def sample_relative(self, study, trial, search_space) -> dict:
        return {}

    def incumbent(self, study: optuna.Study) -> FrozenTrial | None:
        """Replay the finished trials: the current climb's best, or None when the next trial should be
        random (still starting up, or a climb just went stale and restarts)."""
        done = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number)
        if len(done) < self.n_startup_trials:
            return None
        sign = 1 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else -1
        best, stale = None, 0
        for t in done:
            if best is None or sign * t.values[0] > sign * best.values[0]:
                best, stale = t, 0
            else:
                stale += 1
                if stale >= self.patience:
                    best, stale = None, 0
        return best

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        best = self.incumbent(study)
        if best is None:
            return
        movable = [name for name, dist in best.distributions.items() if not dist.single()]
        if movable:
            with self._lock:
                self._moves[trial._trial_id] = (
                    best.params,
                    best.distributions,
                    movable[self._rng.randint(len(movable))],
                )
            study._storage.set_trial_system_attr(trial._trial_id, "greedy:from_trial", best.number)

    def after_trial(self, study, trial, state, values) -> None:
        with self._lock:
            self._moves.pop(trial._trial_id, None)

    def sample_independent(self, study, trial, param_name: str, param_distribution: BaseDistribution):
        with self._lock:
            plan = self._moves.get(trial._trial_id)
        if plan is None or param_name not in plan[0] or plan[1][param_name] != param_distribution:
            return self._random.sample_independent(study, trial, param_name, param_distribution)
        params, _, move = plan
        if param_name != move:
            return params[param_name]
        study._storage.set_trial_system_attr(trial._trial_id, "greedy:moved", param_name)
        return self._neighbour(params[param_name], param_distribution)

    def _neighbour(self, value, dist: BaseDistribution):
        if isinstance(dist, CategoricalDistribution):
            others = [c for c in dist.choices if c != value]
            return others[self._rng.randint(len(others))]
        if not isinstance(dist, (FloatDistribution, IntDistribution)):
            raise TypeError(f"greedy: unsupported distribution {type(dist).__name__}")
        lo, hi, v = dist.low, dist.high, value
        to, back = (math.log, math.exp) if dist.log else (float, float)
        span = to(hi) - to(lo)
        for _ in range(20):  # a rounded step can land where it started: draw again
            new = min(max(back(to(v) + self._rng.normal(0, self.step * span)), lo), hi)
            grid = dist.step
            if isinstance(dist, IntDistribution):
                new = int(round((new - lo) / (grid or 1)) * (grid or 1) + lo)
            elif grid is not None:
                new = float(round((new - lo) / grid) * grid + lo)
            if new != v:
                return min(max(new, lo), hi)
        return new
