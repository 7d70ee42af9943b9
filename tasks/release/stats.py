"""Paired comparisons for decisions that must not rest on noise: which candidate ships, which model
becomes champion.

Both models are measured on the same samples (test rows, sentences) and in the same interleaved
timing rounds, so each comparison is paired: McNemar's exact test for two classifiers' right and
wrong answers, a paired bootstrap for any other per-sample quality, and a bootstrap interval of the
latency ratio over the timing rounds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy.stats import binomtest

BOOTSTRAP = 2000
CONFIDENCE = 0.95


def mcnemar_exact(a_correct: np.ndarray, b_correct: np.ndarray) -> float:
    """Two-sided p-value that classifiers a and b are equally accurate on the same samples: only the
    samples exactly one of them gets right count (b01, b10), binomial with p = 1/2 under the null."""
    a, b = np.asarray(a_correct, bool), np.asarray(b_correct, bool)
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    if only_a + only_b == 0:
        return 1.0
    return float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


def _interval(values: np.ndarray) -> tuple[float, float]:
    tail = (1 - CONFIDENCE) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return float(lo), float(hi)


def paired_bootstrap(
    a: np.ndarray, b: np.ndarray, statistic: Callable[[np.ndarray], float], seed: int = 0
) -> tuple[float, float, float]:
    """statistic(a) - statistic(b) and its 95% percentile interval, resampling the samples (rows of
    both at once, so the pairing holds)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(BOOTSTRAP, len(a)))
    diffs = np.array([statistic(a[i]) - statistic(b[i]) for i in idx])
    return float(statistic(a) - statistic(b)), *_interval(diffs)


def ratio_interval(
    slow_rounds: Sequence[float] | np.ndarray, fast_rounds: Sequence[float] | np.ndarray, seed: int = 0
) -> tuple[float, float, float]:
    """The median per-round ratio slow/fast of two models timed in the same interleaved rounds, with a
    95% bootstrap interval: above 1 means `slow` is the slower one. Per-round ratios cancel the drift
    (clock, other load) both models saw in that round."""
    if len(slow_rounds) != len(fast_rounds) or len(slow_rounds) == 0:
        raise ValueError(
            f"a paired latency comparison needs the same timing rounds for both models; got "
            f"{len(slow_rounds)} and {len(fast_rounds)}"
        )
    ratios = np.asarray(slow_rounds, float) / np.asarray(fast_rounds, float)
    rng = np.random.default_rng(seed)
    medians = np.median(rng.choice(ratios, size=(BOOTSTRAP, len(ratios))), axis=1)
    return float(np.median(ratios)), *_interval(medians)
