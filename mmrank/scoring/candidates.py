"""The reader of scoring: candidate (query, product) pairs from the sources named in `score.candidates`.

Every source is registered in `mmrank.registry.CANDIDATE_SOURCES` with one signature,
`source(lh, run_date, score_cfg, dims) -> DataFrame(query_id, product_id, ...)`; `candidate_pairs` unions the
configured ones. A new source is one function plus its `@CANDIDATE_SOURCES.register(name)`.

- `impressions`: every (query, product) the query log showed up to and including run_date.
- `similarity`: the top-K products per query by embedding cosine, in the modality the query searches with
  (`mmrank.modalities.SEARCH_ORDER`: typed queries text vs product text, voice queries audio vs product audio).
  No cross join: the L2-normalised query matrix is broadcast, each product partition keeps a running
  per-partition top-K (`_partition_topk`), then a window keeps the global top-K (ties: product_id ascending).
"""
from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Mapping

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from mmrank.config import ScoreConf
from mmrank.lakehouse import Lakehouse, sql_date
from mmrank.modalities import QUERY_MODALITIES, l2_normalize, search_choice
from mmrank.registry import CANDIDATE_SOURCES
from mmrank.scoring.features import query_feature_frame, usable

SIM_SCHEMA = "query_id string, product_id string, sim float"
MAX_CELLS = 4_000_000  # floats in one [queries x products] similarity block


@CANDIDATE_SOURCES.register("impressions")
def impression_pairs(lh: Lakehouse, run_date: dt.date, score_cfg: ScoreConf | None = None,
                     dims: Mapping[str, int] | None = None) -> DataFrame:
    """Distinct (query_id, product_id) shown in the query log up to and including run_date."""
    return (lh.read("query_log").where(F.col("run_date") <= F.lit(sql_date(run_date)).cast("date"))
            .select("query_id", "product_id").distinct())


def _partition_topk(queries, k: int, max_cells: int):
    """mapInPandas function: per product partition, the running top-k products per query by cosine.

    `queries` maps modality -> (query ids [Q], L2-normalised matrix [Q, D]) (a broadcast value or a
    closure). Products come as frames of (product_id, modality, embedding); output (query_id, product_id, sim).
    """

    def run(frames: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        qs = queries.value if hasattr(queries, "value") else queries
        best: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for pdf in frames:
            for m, (qids, qmat) in qs.items():
                sub = pdf[pdf["modality"] == m]
                if sub.empty or len(qids) == 0:
                    continue
                pmat = np.stack(sub["embedding"].to_numpy()).astype(np.float32)
                if pmat.shape[1] != qmat.shape[1]:
                    raise ValueError(f"{m}: product dim {pmat.shape[1]} != query dim {qmat.shape[1]}")
                pmat = l2_normalize(pmat)
                pids = sub["product_id"].to_numpy().astype(object)
                step = max(1, max_cells // max(1, len(qids)))
                for s in range(0, len(pids), step):
                    sims = qmat @ pmat[s:s + step].T  # [Q, n]
                    ids = np.broadcast_to(pids[s:s + step], sims.shape)
                    if m in best:
                        sims = np.concatenate([best[m][0], sims], axis=1)
                        ids = np.concatenate([best[m][1], ids], axis=1)
                    if sims.shape[1] > k:
                        idx = np.argpartition(-sims, k - 1, axis=1)[:, :k]
                        sims = np.take_along_axis(sims, idx, 1)
                        ids = np.take_along_axis(ids, idx, 1)
                    best[m] = (np.ascontiguousarray(sims), np.ascontiguousarray(ids))
        for m, (sims, ids) in best.items():
            qids = qs[m][0]
            yield pd.DataFrame({"query_id": np.repeat(qids, sims.shape[1]), "product_id": ids.ravel(),
                                "sim": sims.ravel().astype(np.float32)})

    return run


def query_matrices(queries: pd.DataFrame) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """modality -> (query ids, L2-normalised matrix) of the queries that search with it (`search_choice`);
    `queries` has query_id, q_text, q_audio (arrays or None)."""
    choice = search_choice({m: queries[f"q_{m}"].notna().to_numpy() for m in QUERY_MODALITIES})
    out = {}
    for m, sel in choice.items():
        sub = queries[sel]
        if sub.empty:
            continue
        mat = l2_normalize(np.stack(sub[f"q_{m}"].to_numpy()).astype(np.float32))
        out[m] = (sub["query_id"].to_numpy().astype(object), mat)
    return out


def top_k_by_similarity(lh: Lakehouse, k: int, max_cells: int = MAX_CELLS,
                        dims: Mapping[str, int] | None = None) -> DataFrame:
    """Top-k products per query by cosine similarity of embeddings (query_id, product_id, sim); see the
    module doc. Memory per task: O(Q x k) plus one [Q x chunk] block of at most `max_cells` floats."""
    spark = lh.spark
    qmats = query_matrices(query_feature_frame(lh.read("query_features"), dims).toPandas())
    if not qmats:
        return spark.createDataFrame([], SIM_SCHEMA)
    try:
        shared = spark.sparkContext.broadcast(qmats)
    except Exception:  # Spark Connect / serverless: no SparkContext; the closure ships the matrix per task
        shared = qmats
    prods = lh.read("product_features").where(F.col("modality").isin(*qmats.keys()) & usable(dims)).select(
        "product_id", "modality", "embedding")
    local = prods.mapInPandas(_partition_topk(shared, k, max_cells), SIM_SCHEMA)
    w = Window.partitionBy("query_id").orderBy(F.col("sim").desc(), F.col("product_id"))
    return local.withColumn("_r", F.row_number().over(w)).where(F.col("_r") <= k).drop("_r")


@CANDIDATE_SOURCES.register("similarity")
def similarity_pairs(lh: Lakehouse, run_date: dt.date, score_cfg: ScoreConf,
                     dims: Mapping[str, int] | None = None) -> DataFrame:
    """The `score.similarity_top_k` most similar products per query (query_id, product_id, sim)."""
    return top_k_by_similarity(lh, score_cfg.similarity_top_k, dims=dims)


def candidate_pairs(lh: Lakehouse, run_date: dt.date, sources: list[str] | None = None,
                    dims: Mapping[str, int] | None = None, score_cfg: ScoreConf | None = None) -> DataFrame:
    """Distinct (query_id, product_id) from each source in `sources` (default `score.candidates`)."""
    sc = score_cfg or lh.cfg.score
    names = sources or sc.candidates
    parts = [CANDIDATE_SOURCES.get(n)(lh, run_date, sc, dims).select("query_id", "product_id") for n in names]
    out = parts[0]
    for p in parts[1:]:
        out = out.unionByName(p)
    return out.distinct()
