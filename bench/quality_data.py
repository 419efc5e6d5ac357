"""Data preparation for bench/quality.py: each data set's lakehouse up to `training_lists`, the small-training-set
variant (`sample_train_queries`) and the fine-tuned text tower variant (`finetune_and_refeaturize`)."""
from __future__ import annotations

import datetime as dt
import json
import logging
import time
from pathlib import Path

from pyspark.sql import functions as F

from mmrank.lakehouse import Lakehouse

log = logging.getLogger("mmrank")
HOMEDEPOT_SETS = ["train.list_size=16", "ingest.grade_scale=[1,3]"]  # longest judged list; 1 = irrelevant


def prepare(lh: Lakehouse, dataset: str, run_date: dt.date, args) -> None:
    """Data -> features -> lexical -> lists. Featurize and lexical are incremental: with --reuse, what is
    already encoded/tokenized is not redone."""
    from mmrank.stages import featurize, generate, ingest, labels, lexical, training_lists

    t0 = time.perf_counter()
    if not (args.reuse and lh.exists("labels") and lh.read("labels").limit(1).count()):
        if dataset == "sample":
            generate.run(lh, run_date)
            ingest.run(lh, run_date)
        elif dataset == "fashion":
            ingest.run(lh, run_date, source="fashion", limit=args.fashion_limit)
        else:
            from mmrank.data.homedepot import byo_files

            cat, jud = byo_files(args.homedepot_dir, lh.paths.work("homedepot_files"))
            ingest.run(lh, run_date, source="byo", catalog=str(cat), judgments=str(jud), name="homedepot")
        labels.run(lh, run_date)
        log.info("bench: %s data ready in %.0fs", dataset, time.perf_counter() - t0)
    log.info("bench: featurize %s", featurize.run(lh, run_date))
    log.info("bench: lexical %s", lexical.run(lh, run_date))
    log.info("bench: lists %s", training_lists.run(lh, run_date))


def sample_train_queries(lh: Lakehouse, n: int, seed: int) -> dict[str, int]:
    """Keep a seeded sample of `n` train queries and a proportional validation sample (a user with n judged
    training queries holds out a few for validation too); every test query stays. Rewrites training_lists."""
    df = lh.read("training_lists")
    counts = dict(df.groupBy("split").count().collect())
    n_val = max(1, round(n * counts.get("validation", 0) / max(counts.get("train", 1), 1)))
    h = F.xxhash64(F.lit(seed), "query_id")
    keep = []
    for split, k in (("train", n), ("validation", n_val)):
        keep += [r[0] for r in df.where(F.col("split") == split).orderBy(h, "query_id").limit(k)
                 .select("query_id").collect()]
    sampled = df.where((F.col("split") == "test") | F.col("query_id").isin(keep)).localCheckpoint()
    lh.overwrite("training_lists", sampled)
    return dict(lh.read("training_lists").groupBy("split").count().collect())


def finetune_and_refeaturize(lh: Lakehouse, run_date: dt.date, mode: str) -> tuple[Lakehouse, dict]:
    """Fine-tune the text tower on the lists, then re-featurize products and queries with it and rebuild the
    lists; returns (the lakehouse configured with the new encoder, the fine-tune record)."""
    from mmrank.stages import featurize, finetune_text, training_lists

    t0 = time.perf_counter()
    finetune_text.run(lh, run_date, mode=mode)
    row = lh.read("runs").where(f"stage = 'finetune_text' AND run_date = DATE'{run_date}'").first()
    info = {**json.loads(row["message"]), "finetune_seconds": round(time.perf_counter() - t0, 1)}
    if not info.get("path"):
        log.warning("bench: fine-tuning did not beat the base encoder on validation; lists unchanged")
        return lh, info
    text = lh.cfg.features.text.model_copy(update={"path": info["path"]})
    cfg = lh.cfg.model_copy(update={"features": lh.cfg.features.model_copy(update={"text": text})})
    ft = Lakehouse(lh.spark, cfg)
    t1 = time.perf_counter()
    info["featurize"] = featurize.run(ft, run_date)
    info["featurize_seconds"] = round(time.perf_counter() - t1, 1)
    training_lists.run(ft, run_date)
    return ft, info


def copy_lakehouse(src: Path, dst: Path) -> None:
    """Start a variant's lakehouse from a prepared one (Delta tables use relative paths: a copy is valid)."""
    import shutil

    if not dst.exists() and src.exists():
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("_spark_warehouse", "_work", "_artifacts"))
