"""Ablation of the design notes' variants on in-memory splits (plain pieces: batches in, DataFrames out).

- `grid`: every registered fusion x every registered head (`FUSIONS` x `HEADS`), each trained with
  `train_local` on the train split (the configured `train.*` otherwise, `max_epochs` capped) for every seed,
  evaluated on the test lists against every target (labels, judgments). One row per (fusion, head, seed,
  split, metric).
- `compression`: one trained model (the configured fusion and head) as trained, magnitude-pruned
  (`sparsities`), int8-quantized, and both: NDCG@10 on the test lists, scoring throughput (pairs/s, scores and
  occlusion contributions as the score stage computes them, best of `repeats`) and serialized size
  (`mmrank.ranker.compress.model_size`).
`mmrank.report.ablation_markdown` turns both into the report's tables (mean and sd over seeds).
"""
from __future__ import annotations

import copy
import logging
import time

import numpy as np
import pandas as pd
import torch

from mmrank.config import TrainConf
from mmrank.modalities import ModalityDims
from mmrank.ranker.batch import Batch, iterate_batches
from mmrank.ranker.compress import linear_sparsity, model_size, prune_model, quantize_model
from mmrank.ranker.fit import train_local
from mmrank.ranker.metrics import evaluate_lists
from mmrank.registry import FUSIONS, HEADS

log = logging.getLogger("mmrank.ablation")
_CHUNK = 256


@torch.no_grad()
def _scores(model: torch.nn.Module, batch: Batch, contributions: bool = False) -> np.ndarray:
    model.eval()
    parts = []
    for b in iterate_batches(batch, _CHUNK):
        parts.append(model.score_and_contributions(b)[0] if contributions else model(b))
    return torch.cat(parts).float().numpy().astype(np.float64)


def _metric_rows(scores: np.ndarray, targets: dict[str, np.ndarray], ks: list[int], rule: str) -> list[dict]:
    out = []
    for split, grades in targets.items():
        for key, value in evaluate_lists(scores, grades, ks, rule).items():
            out.append({"split": split, "metric": key, "value": float(value)})
    return out


def grid(train: Batch, val: Batch, test: Batch, targets: dict[str, np.ndarray], dims: ModalityDims,
         cfg: TrainConf, seeds: list[int], ks: list[int], rule: str = "skip",
         fusions: list[str] | None = None, heads: list[str] | None = None) -> pd.DataFrame:
    """Rows fusion, head, seed, split, metric, value, best_epoch, seconds for the fusion x head grid."""
    rows = []
    for fusion in fusions or FUSIONS.names():
        for head in heads or HEADS.names():
            for seed in seeds:
                c = cfg.model_copy(update={"fusion": fusion, "head": head, "seed": seed})
                t0 = time.perf_counter()
                model, res = train_local(train, val, dims, c)
                seconds = time.perf_counter() - t0
                log.info("ablation: %s x %s seed %d: best epoch %d, %.0fs", fusion, head, seed, res.best_epoch,
                         seconds)
                for r in _metric_rows(_scores(model, test), targets, ks, rule):
                    rows.append({"fusion": fusion, "head": head, "seed": seed, **r,
                                 "best_epoch": res.best_epoch, "seconds": seconds})
    return pd.DataFrame(rows)


def _throughput(model: torch.nn.Module, test: Batch, repeats: int) -> float:
    pairs = int(test["p_mask"].shape[0] * test["p_mask"].shape[1])
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        _scores(model, test, contributions=True)
        best = min(best, time.perf_counter() - t0)
    return pairs / best


def compression(model: torch.nn.Module, test: Batch, grades: np.ndarray, sparsities: tuple[float, ...] = (0.5, 0.8),
                repeats: int = 3, k: int = 10, rule: str = "skip") -> pd.DataFrame:
    """Rows variant, sparsity, int8, ndcg@k, pairs_per_s, bytes, zlib_bytes for `model` and its compressions
    (the model itself is not modified)."""
    variants = [("fp32", 0.0, False)] + [(f"pruned {s:.0%}", s, False) for s in sparsities]
    variants += [("int8", 0.0, True)] + [(f"pruned {s:.0%} + int8", s, True) for s in sparsities]
    rows = []
    for name, sparsity, int8 in variants:
        m = prune_model(copy.deepcopy(model).cpu().eval(), sparsity)
        zeros = linear_sparsity(m)
        m = quantize_model(m) if int8 else m
        ndcg = evaluate_lists(_scores(m, test), grades, [k], rule)[f"ndcg@{k}"]
        rows.append({"variant": name, "sparsity": zeros, "int8": int8, f"ndcg@{k}": float(ndcg),
                     "pairs_per_s": _throughput(m, test, repeats), **model_size(m)})
    return pd.DataFrame(rows)
