"""Ranking metrics on `[B, L]` numpy arrays (float64), one value per list; padding = grade PAD_GRADE (-1).

Conventions (all metrics):
- Ranking: real items sorted by score descending; ties broken by slot index ascending (deterministic,
  stable). Padding is ranked last and contributes nothing. Note: sklearn's `ndcg_score` instead averages
  the gain over tied scores (`ignore_ties=False`), so with ties the two differ by design.
- Relevant = grade > 0. `has_relevant(grades)` says which lists have a relevant item.
- Gain: `"exponential"` (2^g - 1, the default, as the architecture specifies) or `"linear"` (g, as trec_eval).
  Discount: 1 / log2(rank + 1). Ideal DCG uses the grades of that list only.
- `k=None` means the whole list. Per-list values of lists without a relevant item are 0 (NDCG, AP, RR);
  how such lists enter a mean is an explicit choice, see `mean_metric`.
"""
from __future__ import annotations

from typing import Iterable, Literal

import numpy as np

from mmrank.ranker.batch import PAD_GRADE

Gain = Literal["exponential", "linear"]
NoRelevantRule = Literal["skip", "zero", "one"]
NO_RELEVANT_RULES = ("skip", "zero", "one")


def _as2d(a) -> np.ndarray:
    arr = np.asarray(a.detach().cpu().numpy() if hasattr(a, "detach") else a, dtype=np.float64)
    return arr.reshape(1, -1) if arr.ndim == 1 else arr


def _gains(grades: np.ndarray, gain: Gain) -> np.ndarray:
    g = np.where(grades == PAD_GRADE, 0.0, np.clip(grades, 0.0, None))
    if gain == "exponential":
        return np.power(2.0, g) - 1.0
    if gain == "linear":
        return g
    raise ValueError(f"unknown gain {gain!r}; use 'exponential' or 'linear'")


def rank_order(scores, grades) -> np.ndarray:
    """[B, L] slot indices in ranked order: real items by score desc, ties by index, padding last."""
    s, g = _as2d(scores), _as2d(grades)
    idx = np.broadcast_to(np.arange(s.shape[1]), s.shape)
    # lexsort: the last key is primary -> (is_padding, -score, index)
    return np.lexsort((idx, -s, g == PAD_GRADE), axis=-1)


def _sorted_grades(scores, grades) -> np.ndarray:
    g = _as2d(grades)
    return np.take_along_axis(g, rank_order(scores, g), axis=1)


def _discounts(n: int, k: int | None) -> np.ndarray:
    d = 1.0 / np.log2(np.arange(2, n + 2, dtype=np.float64))
    if k is not None:
        d[k:] = 0.0
    return d


def has_relevant(grades) -> np.ndarray:
    """Bool [B]: the list has at least one real item with grade > 0."""
    g = _as2d(grades)
    return ((g != PAD_GRADE) & (g > 0)).any(axis=1)


def dcg_at_k(scores, grades, k: int | None = None, gain: Gain = "exponential") -> np.ndarray:
    """[B] DCG@k = sum over the top k ranked items of gain(grade) / log2(rank + 1)."""
    sg = _sorted_grades(scores, grades)
    return (_gains(sg, gain) * _discounts(sg.shape[1], k)).sum(axis=1)


def ideal_dcg_at_k(grades, k: int | None = None, gain: Gain = "exponential") -> np.ndarray:
    """[B] DCG@k of the list's grades in the ideal (grade-descending) order."""
    gains = -np.sort(-_gains(_as2d(grades), gain), axis=1)
    return (gains * _discounts(gains.shape[1], k)).sum(axis=1)


def ndcg_at_k(scores, grades, k: int | None = None, gain: Gain = "exponential") -> np.ndarray:
    """[B] DCG@k / ideal DCG@k; 0 for lists whose ideal DCG is 0 (no relevant item)."""
    dcg, ideal = dcg_at_k(scores, grades, k, gain), ideal_dcg_at_k(grades, k, gain)
    return np.divide(dcg, ideal, out=np.zeros_like(dcg), where=ideal > 0)


def average_precision(scores, grades, k: int | None = None) -> np.ndarray:
    """[B] AP: sum of precision@r at each relevant rank r <= k, divided by the number of relevant items in the
    whole list (trec_eval's `map` / `map_cut_k` denominator, not min(R, k)); 0 when the list has none."""
    rel = (_sorted_grades(scores, grades) > 0).astype(np.float64)
    n_rel = rel.sum(axis=1)
    hits = rel.copy()
    if k is not None:
        hits[:, k:] = 0.0
    prec = np.cumsum(hits, axis=1) / np.arange(1, rel.shape[1] + 1)
    return np.divide((prec * hits).sum(axis=1), n_rel, out=np.zeros_like(n_rel), where=n_rel > 0)


def reciprocal_rank(scores, grades, k: int | None = None) -> np.ndarray:
    """[B] 1 / rank of the first relevant item (within the top k); 0 if there is none."""
    rel = _sorted_grades(scores, grades) > 0
    if k is not None:
        rel[:, k:] = False
    first = rel.argmax(axis=1)
    return np.where(rel.any(axis=1), 1.0 / (first + 1.0), 0.0)


def mean_metric(values, has_rel, rule: NoRelevantRule = "skip") -> float:
    """Mean of per-list `values` under an explicit rule for lists without a relevant item.

    `skip`: excluded from the mean (NaN if no list has a relevant item); `zero`: they count as 0;
    `one`: they count as 1. This is a choice, not a fact: sklearn's `ndcg_score` scores such lists 0 and
    averages them in (= `zero`); trec_eval averages over the queries in the run, scoring such queries 0 for
    ndcg/map/recip_rank (= `zero`; queries absent from the qrels are dropped, which resembles `skip`).
    """
    v, hr = np.asarray(values, np.float64), np.asarray(has_rel, bool)
    if rule == "skip":
        return float(v[hr].mean()) if hr.any() else float("nan")
    if rule in ("zero", "one"):
        return float(np.where(hr, v, 0.0 if rule == "zero" else 1.0).mean()) if v.size else float("nan")
    raise ValueError(f"unknown no_relevant rule {rule!r}; use one of {NO_RELEVANT_RULES}")


def per_list_metrics(scores, grades, ks: Iterable[int] = (5, 10), gain: Gain = "exponential") -> dict[str, np.ndarray]:
    """Per-list values keyed `ndcg@k`, `dcg@k` (each k), `map`, `mrr`."""
    out: dict[str, np.ndarray] = {}
    for k in ks:
        out[f"ndcg@{k}"] = ndcg_at_k(scores, grades, k, gain)
        out[f"dcg@{k}"] = dcg_at_k(scores, grades, k, gain)
    out["map"] = average_precision(scores, grades)
    out["mrr"] = reciprocal_rank(scores, grades)
    return out


def rule_for(metric: str, rule: NoRelevantRule) -> NoRelevantRule:
    """The no-relevant rule applied to `metric`: DCG is not normalised, so `one` makes no sense for it and
    lists without relevant items keep their natural DCG of 0 unless skipped."""
    return "zero" if metric.startswith("dcg") and rule == "one" else rule


def evaluate_lists(scores, grades, ks: Iterable[int] = (5, 10), rule: NoRelevantRule = "skip",
                   gain: Gain = "exponential") -> dict[str, float]:
    """Mean metrics over lists: keys `ndcg@k`, `dcg@k` for each k, `map`, `mrr` (see `mean_metric`, `rule_for`)."""
    hr = has_relevant(grades)
    return {name: mean_metric(v, hr, rule_for(name, rule))
            for name, v in per_list_metrics(scores, grades, ks, gain).items()}
