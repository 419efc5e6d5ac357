"""Training that suits the data size: a small, bounded hyperparameter search on the validation split.

`search` tries the configured setting first, then settings of the grid `train.tune.{lr, weight_decay,
patience}` in a seeded order, `train.tune.trials` in all (0 = off: the configured setting is used as is). Each
trial trains the configured model on the train split (at most `train.tune.max_lists` lists, a seeded sample)
and early-stops on validation; the setting with the best validation `train.early_stopping_metric` wins (the
earlier trial on ties, so the configured setting unless another is better). The record (every trial's
setting, validation value and best epoch, and the choice) is stored in the model artifact's meta (`tuning`).
Since `fit` keeps the untrained model unless an epoch beats it, no trial can end below the prior.
"""
from __future__ import annotations

import itertools
import logging
import random
import time
from typing import Any

import pandas as pd

from mmrank.config import TrainConf
from mmrank.modalities import ModalityDims
from mmrank.ranker.batch import Batch, rows_to_batch

log = logging.getLogger("mmrank.tune")

TUNED = ("lr", "weight_decay", "patience")


def candidates(cfg: TrainConf) -> list[dict[str, Any]]:
    """The configured setting, then up to `tune.trials - 1` other grid settings in a seeded order."""
    t = cfg.tune
    first = {k: getattr(cfg, k) for k in TUNED}
    grid = [dict(zip(TUNED, v)) for v in itertools.product(t.lr, t.weight_decay, t.patience)]
    grid = [g for g in grid if g != first]
    random.Random(cfg.seed).shuffle(grid)
    return [first, *grid][:max(t.trials, 1)]


def search(train: Batch, val: Batch, dims: ModalityDims, cfg: TrainConf,
           align: dict | None = None) -> tuple[TrainConf, dict]:
    """(TrainConf with the chosen setting, record). With `tune.trials` 0 or 1 nothing is trained."""
    from mmrank.ranker.fit import train_local

    tried = candidates(cfg)
    if len(tried) < 2:
        return cfg, {"trials": [], "chosen": tried[0], "metric": cfg.early_stopping_metric}
    trials = []
    for setting in tried:
        t0 = time.perf_counter()
        _, res = train_local(train, val, dims, cfg.model_copy(update=setting), align)
        trials.append({**setting, "val": res.best_metrics[cfg.early_stopping_metric], "best_epoch": res.best_epoch,
                       "epochs_run": res.epochs_run, "seconds": round(time.perf_counter() - t0, 1)})
        log.info("tune: %s -> val %s %.4f (best epoch %d)", setting, cfg.early_stopping_metric, trials[-1]["val"],
                 res.best_epoch)
    best = max(range(len(trials)), key=lambda i: (trials[i]["val"], -i))
    chosen = tried[best]
    return cfg.model_copy(update=chosen), {"trials": trials, "chosen": chosen, "metric": cfg.early_stopping_metric,
                                           "train_lists": int(train["grades"].shape[0]),
                                           "val_lists": int(val["grades"].shape[0])}


def sample_split(lh, split: str, n: int, seed: int) -> pd.DataFrame:
    """At most `n` lists of one `training_lists` split, a seeded hash sample (bounded driver memory)."""
    from pyspark.sql import functions as F

    return (lh.read("training_lists").where(F.col("split") == split)
            .orderBy(F.xxhash64(F.lit(seed), "query_id"), "query_id").limit(n).toPandas())


def tune_from_lists(lh, cfg: TrainConf, dims: ModalityDims, align: dict | None = None) -> tuple[TrainConf, dict]:
    """`search` on samples of the lakehouse's train / validation lists (the train stage's hook)."""
    if cfg.tune.trials < 2:
        return search({}, {}, dims, cfg)
    frames = {s: sample_split(lh, s, cfg.tune.max_lists, cfg.seed) for s in ("train", "validation")}
    if frames["train"].empty or frames["validation"].empty:
        log.warning("tune: no train or validation lists; using the configured setting")
        return cfg, {"trials": [], "chosen": {k: getattr(cfg, k) for k in TUNED}, "skipped": "empty split"}
    batches = {s: rows_to_batch(f, dims, cfg.list_size) for s, f in frames.items()}
    return search(batches["train"], batches["validation"], dims, cfg, align)
