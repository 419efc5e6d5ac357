"""Honest comparisons of two rankers on the same queries: a paired bootstrap over per-query metric values.

Per-query values come from the evaluation tasks (`metric_tasks.metric_sums(per_list=...)`), NaN for lists
without a relevant item (the `skip` rule leaves them out of every mean; they are dropped here too).
`paired_bootstrap(a, b)` resamples queries with replacement (the same resample for both models) and returns the
mean difference a - b with a percentile interval: when the interval excludes 0 the gap is not query-sampling
noise at that level; when it contains 0 the gap is within noise. Values averaged over model seeds per query
first (`np.nanmean` over a [seeds, queries] array) compare the models, not one lucky seed.
"""
from __future__ import annotations

import numpy as np


def paired_bootstrap(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, level: float = 0.95,
                     seed: int = 0) -> dict[str, float]:
    """Mean of a - b over the queries where both are defined, with a `level` percentile bootstrap interval
    (queries resampled with replacement, `n_boot` times, seeded) and the share of resamples where a > b."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same queries: shapes {a.shape} and {b.shape}")
    d = (a - b)[~(np.isnan(a) | np.isnan(b))]
    if d.size == 0:
        raise ValueError("no query has both values")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"diff": float(d.mean()), "lo": float(lo), "hi": float(hi), "n": int(d.size),
            "p_better": float((means > 0).mean())}


def verdict(ci: dict[str, float], level: float = 0.95) -> str:
    """Words for an interval: which side of zero it lies on, or that the gap is within noise."""
    pct = f"{100 * level:.0f}%"
    if ci["lo"] > 0:
        return f"better ({pct} interval above 0)"
    if ci["hi"] < 0:
        return f"worse ({pct} interval below 0)"
    return f"within noise ({pct} interval contains 0)"
