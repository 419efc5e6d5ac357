"""The reader of scoring: candidate (query, product) pairs from the sources named in `score.candidates`.

Every source is registered in `mmrank.registry.CANDIDATE_SOURCES` with one signature,
`source(lh, run_date, score_cfg, dims, snapshot) -> DataFrame(query_id, product_id, ...)` (`snapshot`: the score
run's bucketed `snapshot.FeatureSnapshot`, or None); `candidate_pairs` unions the configured ones. A new source
is one function plus its `@CANDIDATE_SOURCES.register(name)`.

- `impressions`: every (query, product) the query log showed up to and including run_date.
- `similarity`: the top-K products per query by embedding cosine, in the modality the query searches with
  (`mmrank.modalities.SEARCH_ORDER`: typed queries text vs product text, voice queries audio vs product audio).
  Blocked, neither side broadcast: the features are bucketed by id (`snapshot.snapshot_tables`); one task per
  (query bucket, product group) reads its query bucket once and streams the product buckets of its group,
  keeping a running top-K per query over [query block x product chunk] similarity tiles of at most
  `max_cells` floats; then a window keeps the global top-K of each query's G group results (ties: product_id
  ascending). With G = 1 (the default when query buckets already fill the task slots) each task's result is
  final.
"""
from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterator, Mapping

import numpy as np
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from mmrank.config import ScoreConf
from mmrank.lakehouse import Lakehouse, sql_date
from mmrank.modalities import PRODUCT_MODALITIES, QUERY_MODALITIES, l2_normalize, search_choice
from mmrank.registry import CANDIDATE_SOURCES
from mmrank.scoring.snapshot import FeatureSnapshot, read_bucket, snapshot_tables, task_slots

SIM_SCHEMA = "query_id string, product_id string, sim float"
MAX_CELLS = 4_000_000  # floats in one [query block x product chunk] similarity tile
QUERY_BLOCK = 2048     # queries per tile (the product chunk is MAX_CELLS / QUERY_BLOCK wide)


@CANDIDATE_SOURCES.register("impressions")
def impression_pairs(lh: Lakehouse, run_date: dt.date, score_cfg: ScoreConf | None = None,
                     dims: Mapping[str, int] | None = None, snapshot: FeatureSnapshot | None = None) -> DataFrame:
    """Distinct (query_id, product_id) shown in the query log up to and including run_date."""
    return (lh.read("query_log").where(F.col("run_date") <= F.lit(sql_date(run_date)).cast("date"))
            .select("query_id", "product_id").distinct())


class RunningTopK:
    """Per query of a block, the k best (similarity, product id) seen so far."""

    def __init__(self, n_queries: int, k: int):
        self.k = k
        self.sims = np.full((n_queries, 0), -np.inf, np.float32)
        self.ids = np.empty((n_queries, 0), dtype=object)

    def add(self, sims: np.ndarray, ids: np.ndarray) -> None:
        """Merge a [n_queries, n] tile of similarities to the products `ids` [n]."""
        s = np.concatenate([self.sims, sims], axis=1)
        i = np.concatenate([self.ids, np.broadcast_to(ids, sims.shape)], axis=1)
        if s.shape[1] > self.k:
            keep = np.argpartition(-s, self.k - 1, axis=1)[:, :self.k]
            s, i = np.take_along_axis(s, keep, 1), np.take_along_axis(i, keep, 1)
        self.sims, self.ids = np.ascontiguousarray(s), np.ascontiguousarray(i)


def _cell_topk(snap: FeatureSnapshot, dims: Mapping[str, int], k: int, groups: int, max_cells: int):
    """mapInArrow function over cell ids: cell = query bucket * groups + product group -> its queries' top-k
    among the products of that group's buckets."""
    import pyarrow as pa

    def run(batches: Iterator) -> Iterator:
        for b in batches:
            for cell in b.column("id").to_numpy():
                qb, g = divmod(int(cell), groups)
                qids, qfeat = read_bucket(snap, "queries", qb, dims)
                choice = search_choice({m: qfeat["mask"][:, i] > 0 for i, m in enumerate(QUERY_MODALITIES)})
                blocks = [(m, np.flatnonzero(sel)[s:s + QUERY_BLOCK]) for m, sel in choice.items()
                          for s in range(0, int(sel.sum()), QUERY_BLOCK)]
                best = [RunningTopK(len(rows), k) for _, rows in blocks]
                qmats = [l2_normalize(qfeat[m][rows]) for m, rows in blocks]
                for pb in range(g, snap.product_buckets, groups):
                    pids, pfeat = read_bucket(snap, "products", pb, dims)
                    for m in {m for m, _ in blocks}:
                        have = pfeat["mask"][:, PRODUCT_MODALITIES.index(m)] > 0
                        pmat, pm_ids = l2_normalize(pfeat[m][have]), pids.to_numpy()[have].astype(object)
                        for j, (bm, rows) in enumerate(blocks):
                            if bm != m:
                                continue
                            step = max(1, max_cells // max(1, len(rows)))
                            for s in range(0, len(pm_ids), step):
                                best[j].add(qmats[j] @ pmat[s:s + step].T, pm_ids[s:s + step])
                for (_, rows), top in zip(blocks, best):
                    if top.sims.size:
                        yield pa.RecordBatch.from_arrays(
                            [pa.array(np.repeat(qids.to_numpy()[rows].astype(object), top.sims.shape[1])),
                             pa.array(top.ids.ravel()), pa.array(top.sims.ravel().astype(np.float32))],
                            names=["query_id", "product_id", "sim"])
    return run


def top_k_by_similarity(lh: Lakehouse, k: int, max_cells: int = MAX_CELLS, dims: Mapping[str, int] | None = None,
                        snapshot: FeatureSnapshot | None = None) -> DataFrame:
    """Top-k products per query by cosine similarity of embeddings (query_id, product_id, sim); see the module
    doc. Without a `snapshot` one is written under `storage.work_dir/similarity` (replaced by the next call).
    Memory per task: one query bucket, one product bucket and a [QUERY_BLOCK x chunk] tile of <= max_cells."""
    slots = task_slots(lh.spark)
    if snapshot is None:
        snapshot = snapshot_tables(lh, str(lh.paths.work("similarity")), dims, lh.cfg.score.bucket_mb, slots)
    groups = max(1, min(snapshot.product_buckets, math.ceil(slots / snapshot.query_buckets)))
    n_cells = snapshot.query_buckets * groups
    local = lh.spark.range(0, n_cells, 1, n_cells).mapInArrow(_cell_topk(snapshot, dims, k, groups, max_cells),
                                                          SIM_SCHEMA)
    if groups == 1:
        return local
    w = Window.partitionBy("query_id").orderBy(F.col("sim").desc(), F.col("product_id"))
    return local.withColumn("_r", F.row_number().over(w)).where(F.col("_r") <= k).drop("_r")


@CANDIDATE_SOURCES.register("similarity")
def similarity_pairs(lh: Lakehouse, run_date: dt.date, score_cfg: ScoreConf,
                     dims: Mapping[str, int] | None = None, snapshot: FeatureSnapshot | None = None) -> DataFrame:
    """The `score.similarity_top_k` most similar products per query (query_id, product_id, sim)."""
    return top_k_by_similarity(lh, score_cfg.similarity_top_k, dims=dims, snapshot=snapshot)


def candidate_pairs(lh: Lakehouse, run_date: dt.date, sources: list[str] | None = None,
                    dims: Mapping[str, int] | None = None, score_cfg: ScoreConf | None = None,
                    snapshot: FeatureSnapshot | None = None) -> DataFrame:
    """Distinct (query_id, product_id) from each source in `sources` (default `score.candidates`)."""
    sc = score_cfg or lh.cfg.score
    names = sources or sc.candidates
    parts = [CANDIDATE_SOURCES.get(n)(lh, run_date, sc, dims, snapshot).select("query_id", "product_id")
             for n in names]
    out = parts[0]
    for p in parts[1:]:
        out = out.unionByName(p)
    return out.distinct()
