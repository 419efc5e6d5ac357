"""Ranking metrics computed inside Spark tasks: only sums per (model, target, metric) leave the executors.

`metric_sums(models, ...)` is a `mapInArrow` function over test-list rows (`training_lists` columns plus
`judged`, the per-slot judgment grades or null): each task rebuilds its lists' batch (`rows_to_batch`), scores it
with every model and adds up per-list metric values. `mean_of` turns the sums into the `mean_metric` of
`mmrank.ranker.metrics` under the `no_relevant` rule. With `per_list` (benchmarks only: it grows with the test
queries) the tasks also emit each list's value of that metric, keyed by query_id, for paired comparisons.
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import pandas as pd

from mmrank.modalities import ModalityDims
from mmrank.ranker.batch import Batch, rows_to_batch
from mmrank.ranker.metrics import has_relevant, per_list_metrics

Scorer = Callable[[Batch], np.ndarray]
SUMS_SCHEMA = ("model_name string, split string, metric string, rel_sum double, n_rel long, n long, judged long, "
               "query_id string")


def targets_of(pdf: pd.DataFrame, batch: Batch) -> dict[str, np.ndarray]:
    """`test` grades [B, L] and `test_judgments`: judged lists regraded slot by slot, the others unchanged."""
    grades = batch["grades"].numpy().astype(np.float64)
    regraded = grades.copy()
    for i, g in enumerate(pdf["judged"]):
        if g is not None:
            g = np.asarray(g, np.float64)[:grades.shape[1]]
            regraded[i, :len(g)] = g
    return {"test": grades, "test_judgments": regraded}


def metric_sums(models: dict[str, Scorer], dims: ModalityDims, list_size: int, ks: list[int],
                per_list: str | None = None) -> Callable[[Iterator], Iterator]:
    """mapInArrow function (schema `SUMS_SCHEMA`): per (model, target, metric) the sum of per-list values over
    lists with a relevant item, how many those are, how many lists, how many were judged (query_id null); with
    `per_list`, also one row per list with that metric's value (NaN without a relevant item) and its query_id."""
    def run(batches: Iterator) -> Iterator:
        import pyarrow as pa

        from mmrank.encoders.device import set_threads, task_threads

        set_threads(task_threads())
        acc: dict[tuple[str, str, str], list[float]] = {}
        lists: list[tuple[str, str, str, float, str]] = []
        for b in batches:
            if not b.num_rows:
                continue
            pdf = b.to_pandas()
            batch = rows_to_batch(pdf, dims, list_size)
            targets = targets_of(pdf, batch)
            n_judged = int(pdf["judged"].notna().sum())
            for name, fn in models.items():
                scores = np.asarray(fn(batch), np.float64)
                for split, g in targets.items():
                    hr = has_relevant(g)
                    for key, v in per_list_metrics(scores, g, ks).items():
                        a = acc.setdefault((name, split, key), [0.0, 0, 0, 0])
                        a[0] += float(v[hr].sum())
                        a[1] += int(hr.sum())
                        a[2] += len(v)
                        a[3] += n_judged
                        if key == per_list:
                            lists += [(name, split, key, float(x) if r else float("nan"), q)
                                      for x, r, q in zip(v, hr, pdf["query_id"])]
        rows = [(*k, *v, None) for k, v in acc.items()] + [(*r[:4], 1, 1, 0, r[4]) for r in lists]
        if rows:
            cols = list(zip(*rows))
            types = [pa.string()] * 3 + [pa.float64(), pa.int64(), pa.int64(), pa.int64(), pa.string()]
            yield pa.RecordBatch.from_arrays([pa.array(c, t) for c, t in zip(cols, types)],
                                             names=["model_name", "split", "metric", "rel_sum", "n_rel", "n",
                                                    "judged", "query_id"])
    return run


def mean_of(rel_sum: float, n_rel: int, n: int, rule: str) -> float:
    """`mean_metric` from sums (lists without a relevant item have value 0 for every metric)."""
    if rule == "skip":
        return rel_sum / n_rel if n_rel else float("nan")
    if not n:
        return float("nan")
    return (rel_sum + (n - n_rel if rule == "one" else 0)) / n
