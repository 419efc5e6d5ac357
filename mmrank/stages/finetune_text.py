"""Stage `finetune_text` (opt-in, not nightly): fine-tune the text encoder on `training_lists` with the ranking
loss (`mmrank.ranker.finetune`, settings `finetune.*`) and write it as a new versioned encoder folder.

Reads a seeded sample of the train / validation lists (`finetune.max_lists`; validation a quarter of that), the
product texts (the featurize template `features.text.product_fields`) and query texts of their pairs, and the
configured text encoder as the base (it must be a plain HF folder, not an adapter). The runs row's
model_version is the new encoder's version; `features.text.path=<folder>` then makes featurize re-encode
products and queries with it. When no epoch beats the base encoder on validation nothing is written.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import time

import numpy as np
from pyspark.sql import functions as F

from mmrank.encoders.registry import get_encoder
from mmrank.encoders.text import ADAPTER_FILE, TextEncoder
from mmrank.lakehouse import Lakehouse
from mmrank.ranker.finetune import build_module, index_lists, result_of, save_encoder, train_tower
from mmrank.ranker.tune import sample_split
from mmrank.runs import StageRun
from mmrank.stages import stage
from mmrank.stages.featurize import product_text

log = logging.getLogger("mmrank.finetune")


def _texts(lh: Lakehouse, frames: dict) -> tuple[list[str], dict[str, int], dict[str, int]]:
    """(texts, query_id -> index, product_id -> index) of the sampled lists' queries and products."""
    spark = lh.spark
    qids = sorted({q for f in frames.values() for q in f["query_id"]})
    pids = sorted({p for f in frames.values() for ps in f["product_ids"] for p in ps if p})
    q = (lh.read("queries").join(spark.createDataFrame([(x,) for x in qids], "query_id string"), "query_id")
         .select("query_id", F.trim("query_text").alias("t")).where(F.length("t") > 0).toPandas())
    p = (lh.read("products").join(spark.createDataFrame([(x,) for x in pids], "product_id string"), "product_id")
         .select("product_id", product_text(lh.cfg.features).alias("t")).where(F.length("t") > 0).toPandas())
    texts = q["t"].tolist() + p["t"].tolist()
    return (texts, {k: i for i, k in enumerate(q["query_id"])},
            {k: len(q) + i for i, k in enumerate(p["product_id"])})


@stage("finetune_text", inputs=("training_lists", "products", "queries"))
def run(lh: Lakehouse, run_date: dt.date, rec: StageRun, mode: str | None = None) -> dict[str, int]:
    """Fine-tune; counts of lists and epochs. `rec.model_version` = the new encoder version (or the base's)."""
    cfg = lh.cfg.finetune.model_copy(update={"mode": mode}) if mode else lh.cfg.finetune
    base = get_encoder("text", lh.cfg.features)
    if not isinstance(base, TextEncoder) or (base.path / ADAPTER_FILE).exists():
        raise ValueError(f"finetune_text needs a plain HF text encoder as base; features.text is {base!r}")
    t0 = time.perf_counter()
    seed, L = lh.cfg.train.seed, lh.cfg.train.list_size
    frames = {"train": sample_split(lh, "train", cfg.max_lists, seed),
              "validation": sample_split(lh, "validation", max(cfg.max_lists // 4, 1), seed)}
    if frames["train"].empty or frames["validation"].empty:
        raise ValueError("finetune_text needs train and validation lists: run training_lists first")
    texts, q_index, p_index = _texts(lh, frames)
    data = {s: index_lists(f, q_index, p_index, L) for s, f in frames.items()}
    module = build_module(cfg.mode, base.path, texts, lambda t: base.encode(t), cfg)
    state, info = train_tower(module, data["train"], data["validation"], cfg, lh.cfg.train.loss, seed)
    path = version = None
    if state is not None:
        name = "all-MiniLM-L6-v2" if lh.cfg.features.text.path is None else base.path.name
        meta = {"base": str(base.path), "base_version": base.version, "mode": cfg.mode, "run_date": str(run_date),
                "training_lists_version": lh.version("training_lists"), "settings": cfg.model_dump(mode="json"),
                **{k: v for k, v in info.items()}}
        path = save_encoder(lh.paths.text_encoders, base.path, name, module, state, cfg.mode, meta)
        version = get_encoder("text", lh.cfg.features.model_copy(update={"text": lh.cfg.features.text.model_copy(
            update={"path": str(path)})})).version
    res = result_of(path, version, info, time.perf_counter() - t0, data["train"], data["validation"])
    rec.model_version = version or base.version
    rec.message = json.dumps({k: v for k, v in dataclasses.asdict(res).items() if k not in ("train_lists", "val_lists")})
    log.info("finetune_text: %s", res)
    return {"train_lists": res.train_lists, "val_lists": res.val_lists, "epochs": res.epochs_run,
            "texts": len(texts), "improved": int(state is not None),
            "best_val_ndcg10_x1e4": int(np.round(res.best_val_ndcg10 * 1e4))}
