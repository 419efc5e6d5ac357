"""Stage `training_lists`: labels x query/product features -> one fixed-size, flattened list per query.

Each query's candidates (its `labels` rows whose product has at least one feature) become a list of exactly
`train.list_size` slots, in the `training_lists` contract layout (docs/architecture.md):

- more candidates than slots: keep every relevant item (grade > 0; highest grades first if even those
  overflow), then negatives in a seeded hash order; fewer: pad with grade -1, zero features, mask 0;
- kept candidates are put in a seeded hash order, so list position carries no information about the grade;
- a missing modality is a zero vector with mask 0; an embedding whose length differs from its modality's
  width is treated as missing (and quarantined);
- the split is by query: a seeded hash of `query_id` in [0, 1) against the cumulative `train.split` fractions;
- `p_lex` holds each slot's lexical match features (`mmrank.lexical.features.with_lex`; zeros without the
  lexical tables).

Everything is Spark SQL (window + collect_list + array expressions); the table is replaced in one commit.
`load_split` reads (a bounded sample of) one split back as the batch tensors of
`mmrank.ranker.batch.rows_to_batch`.
"""
from __future__ import annotations

import datetime as dt
import logging
from functools import reduce

import pandas as pd
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from mmrank.lakehouse import Lakehouse
from mmrank.lexical.features import N_LEX, with_lex
from mmrank.modalities import PRODUCT_MODALITIES, QUERY_MODALITIES, ModalityDims, widths_from_list_lengths
from mmrank.runs import StageRun
from mmrank.scoring.features import bad_feature_rows, pivot
from mmrank.stages import stage

log = logging.getLogger("mmrank")

STAGE = "training_lists"
SPLITS = ("train", "validation", "test")
_HASH_BUCKETS = 1_000_000


def feature_dims(lh: Lakehouse) -> dict[str, int]:
    """Width of each modality: the most common embedding length over both feature tables.

    A modality with no embedding anywhere (e.g. audio in the fashion set) gets width 1: an all-zero column
    with mask 0 keeps every tensor shape valid.
    """
    parts = [lh.read(t).select("modality", F.size("embedding").alias("d"))
             for t in ("product_features", "query_features")]
    rows = parts[0].unionByName(parts[1]).groupBy("modality", "d").count().collect()
    best: dict[str, tuple[int, int]] = {}
    for r in rows:
        if r["d"] and r["d"] > 0 and r["count"] > best.get(r["modality"], (0, 0))[1]:
            best[r["modality"]] = (int(r["d"]), int(r["count"]))
    return {m: best.get(m, (1, 0))[0] for m in PRODUCT_MODALITIES}


def _zeros(n: str | int) -> str:
    return f"array_repeat(CAST(0 AS FLOAT), {n})"


def _flat(field: str, width: int, list_size: int) -> F.Column:
    """Row-major [list_size * width] array of a candidate field, zeros where missing, zero-padded."""
    return F.expr(f"concat(flatten(transform(cands, c -> coalesce(c.{field}, {_zeros(width)}))), "
                  f"{_zeros(f'({list_size} - size(cands)) * {width}')})")


def split_column(query_id: F.Column, seed: int, fractions: dict[str, float]) -> F.Column:
    """Deterministic split name from a seeded hash of the query id (same query -> same split, always)."""
    u = F.pmod(F.xxhash64(F.lit(seed), query_id), F.lit(_HASH_BUCKETS)) / F.lit(float(_HASH_BUCKETS))
    cum, expr = 0.0, None
    for name in SPLITS[:-1]:
        cum += fractions[name]
        expr = (F.when(u < cum, name) if expr is None else expr.when(u < cum, name))
    return expr.otherwise(SPLITS[-1])


def build(lh: Lakehouse, run_date: dt.date) -> tuple[DataFrame, DataFrame, dict[str, int]]:
    """(lists in the contract schema, quarantine rows, modality dims). Nothing is written."""
    tc = lh.cfg.train
    L, seed = tc.list_size, tc.seed
    dims = feature_dims(lh)
    pf, qf = lh.read("product_features"), lh.read("query_features")
    prods = pivot(pf, "product_id", PRODUCT_MODALITIES, dims)
    queries = pivot(qf, "query_id", QUERY_MODALITIES, dims)
    labels = (lh.read("labels").groupBy("query_id", "product_id")
              .agg(F.max("label").cast("double").alias("grade")))

    cand = labels.join(prods, "product_id", "left").withColumn(
        "has_product", reduce(lambda a, b: a | b, [F.col(m).isNotNull() for m in PRODUCT_MODALITIES]))
    cand = cand.join(queries.withColumn("has_query", F.lit(True)).select("query_id", "has_query"),
                     "query_id", "left")

    # --- quarantine: whole queries without usable features, and embeddings of the wrong width ----------
    per_q = cand.groupBy("query_id").agg(
        F.max(F.col("has_query").isNotNull()).alias("q_ok"), F.max("has_product").alias("p_ok"),
        F.count("*").alias("n"))
    bad_q = per_q.where(~F.col("q_ok") | ~F.col("p_ok")).select(
        F.col("query_id").alias("record_id"),
        F.when(~F.col("q_ok"), F.lit("query has no features"))
         .otherwise(F.lit("no candidate product has features")).alias("reason"),
        F.concat(F.lit("labelled candidates="), F.col("n").cast("string")).alias("payload"))
    bad_p = cand.where(~F.col("has_product")).select(
        F.concat_ws("/", "query_id", "product_id").alias("record_id"),
        F.lit("candidate product has no features").alias("reason"), F.lit("").alias("payload"))
    quarantine = bad_q.unionByName(bad_p).unionByName(bad_feature_rows(pf, qf, dims))

    # --- deterministic candidate subset and order ------------------------------------------------------
    usable = cand.where(F.col("has_product") & F.col("has_query").isNotNull()).withColumn(
        "h", F.xxhash64(F.lit(seed), "query_id", "product_id"))
    keep_order = Window.partitionBy("query_id").orderBy(
        (F.col("grade") > 0).desc(), F.when(F.col("grade") > 0, F.col("grade")).desc_nulls_last(), "h",
        "product_id")
    kept = with_lex(lh, usable.withColumn("slot_rank", F.row_number().over(keep_order))
                    .where(F.col("slot_rank") <= L))
    grouped = kept.groupBy("query_id").agg(F.array_sort(F.collect_list(F.struct(
        "h", "product_id", F.col("grade").cast("float").alias("grade"),
        *PRODUCT_MODALITIES, "lex"))).alias("cands"))

    present = ", ".join(f"CAST(c.{m} IS NOT NULL AS FLOAT)" for m in PRODUCT_MODALITIES)
    lists = grouped.join(queries, "query_id").select(
        "query_id",
        split_column(F.col("query_id"), seed, tc.split).alias("split"),
        F.size("cands").alias("list_len"),
        F.expr("transform(cands, c -> c.product_id)").alias("product_ids"),
        F.expr(f"concat(transform(cands, c -> c.grade), "
               f"array_repeat(CAST(-1 AS FLOAT), {L} - size(cands)))").alias("grades"),
        F.coalesce(F.col("text"), F.expr(_zeros(dims["text"]))).alias("q_text"),
        F.coalesce(F.col("audio"), F.expr(_zeros(dims["audio"]))).alias("q_audio"),
        F.array(*[F.col(m).isNotNull().cast("float") for m in QUERY_MODALITIES]).alias("q_mask"),
        *[_flat(m, dims[m], L).alias(f"p_{m}") for m in PRODUCT_MODALITIES],
        F.expr(f"concat(flatten(transform(cands, c -> array({present}))), "
               f"{_zeros(f'({L} - size(cands)) * 3')})").alias("p_mask"),
        _flat("lex", N_LEX, L).alias("p_lex"),
        F.lit(run_date).cast("date").alias("run_date"),
    )
    return lists, quarantine, dims


@stage(STAGE, inputs=("labels", "product_features", "query_features", "lexical_tokens", "lexical_stats"),
       outputs=("training_lists",))
def run(lh: Lakehouse, run_date: dt.date, rec: StageRun) -> dict[str, int]:
    """Build and write `training_lists` (one atomic overwrite: the lists of the current labels/features)."""
    lists, quarantine, dims = build(lh, run_date)
    lh.overwrite("training_lists", lists.orderBy("query_id"))
    counts = {f"lists_{r['split']}": int(r["count"])
              for r in lh.read("training_lists").groupBy("split").count().collect()}
    counts["lists"] = sum(counts.values())
    counts["quarantined"] = lh.quarantine(quarantine, STAGE, run_date)
    counts.update({f"dim_{m}": d for m, d in dims.items()})
    return counts


# ---- bounded readers for single-process training / notebooks ----------------------------------------------
def read_split(lh: Lakehouse, split: str, max_lists: int | None = None) -> pd.DataFrame:
    """At most `max_lists` (default `evaluate.driver_max_lists`) lists of one split as pandas rows, ordered by
    query_id. A larger split is sampled by a seeded hash of query_id (the same lists every time), so the driver
    never holds more than the configured bound whatever the number of queries."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} must be one of {SPLITS}")
    bound = max_lists or lh.cfg.evaluate.driver_max_lists
    rows = lh.read("training_lists").where(F.col("split") == split)
    sampled = rows.orderBy(F.xxhash64(F.lit(lh.cfg.train.seed), "query_id"), "query_id").limit(bound + 1)
    out = sampled.limit(bound).orderBy("query_id").toPandas()
    if len(out) == bound and sampled.count() > bound:
        log.warning("read_split(%s): sampled %d lists (evaluate.driver_max_lists) of a larger split", split, bound)
    return out


def list_dims(lh: Lakehouse) -> ModalityDims:
    """Embedding widths of the lists in `training_lists` (from its array lengths); `product_features.dim` for
    a modality absent from every list."""
    L = lh.cfg.train.list_size
    r = lh.read("training_lists").agg(
        F.max(F.size("grades")).alias("l"), *[F.max(F.size(c)).alias(c)
                                              for c in ("q_text", "p_image", "q_audio", "p_audio")]).first()
    if r is None or not r["l"] or r["l"] <= 0:
        raise ValueError("training_lists is empty: run the training_lists stage first")
    found = widths_from_list_lengths(r.asDict(), r["l"])
    missing = [m for m, d in found.items() if d <= 0]
    if missing:
        feats = {row["modality"]: row["d"] for row in lh.read("product_features").groupBy("modality")
                 .agg(F.max("dim").alias("d")).collect()}
        for m in missing:
            if not feats.get(m):
                raise ValueError(f"cannot infer the {m} embedding dim from training_lists or product_features")
            found[m] = feats[m]
    if r["l"] != L:
        log.warning("training_lists has lists of %d slots, train.list_size is %d", r["l"], L)
    return ModalityDims(**found)


def load_split(lh: Lakehouse, split: str, list_size: int | None = None, max_lists: int | None = None) -> dict:
    """One split (at most `max_lists` lists, see `read_split`) as a batch dict of torch tensors
    (`rows_to_batch`); empty dict if the split has no rows."""
    from mmrank.ranker.batch import rows_to_batch

    L = list_size or lh.cfg.train.list_size
    rows = read_split(lh, split, max_lists)
    if rows.empty:
        return {}
    return rows_to_batch(rows, list_dims(lh), L)
