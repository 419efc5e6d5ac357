"""Feature rows -> what a model can use, shared by the training_lists stage and scoring.

- `usable(dims)`: an embedding is usable when every value is finite and (dims known) its length is its
  modality's width; `bad_feature_rows` turns the others into quarantine rows (never trained on, never scored).
- `pivot`: one row per query or product with one embedding column per modality (null where missing/unusable).
- `usable_rows` / `with_presence` / `coverage_counts` / `scorable`: which candidate pairs can be scored (a pair
  is scored when its query and its product each have at least one usable embedding), by key only.
All functions take and return DataFrames (feature tables in the `product_features` / `query_features` layout).
"""
from __future__ import annotations

from collections.abc import Mapping

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from mmrank.modalities import PRODUCT_MODALITIES, QUERY_MODALITIES

NON_FINITE = "embedding has non-finite values (NaN/inf)"
WRONG_WIDTH = "embedding width differs from the expected width"


def finite(c: str = "embedding") -> Column:
    """True when every element of the array column is a finite number (no null, NaN or +-inf)."""
    return F.forall(c, lambda x: x.isNotNull() & ~F.isnan(x) & (F.abs(x) < F.lit(float("inf"))))


def width_of(dims: Mapping[str, int]) -> Column:
    """The expected embedding length of each row's `modality`."""
    return F.element_at(F.create_map(*[x for m, d in dims.items() for x in (F.lit(m), F.lit(int(d)))]),
                        F.col("modality"))


def usable(dims: Mapping[str, int] | None = None) -> Column:
    """Feature rows a model can use: finite values and (when `dims` is known) the modality's width."""
    ok = finite()
    if dims:
        ok = ok & (F.size("embedding") == width_of(dims))
    return ok


def _bad_rows(df: DataFrame, key: str, table: str, dims: Mapping[str, int]) -> DataFrame:
    return df.where(~usable(dims)).select(
        F.concat_ws(":", key, "modality").alias("record_id"),
        F.when(~finite(), F.lit(NON_FINITE)).otherwise(F.lit(WRONG_WIDTH)).alias("reason"),
        F.concat(F.lit(f"{table} len="), F.size("embedding").cast("string"), F.lit(" expected="),
                 width_of(dims).cast("string")).alias("payload"))


def bad_feature_rows(products: DataFrame, queries: DataFrame, dims: Mapping[str, int]) -> DataFrame:
    """Quarantine rows (record_id `<id>:<modality>`, reason, payload) for unusable product/query embeddings."""
    p = products.where(F.col("modality").isin(*PRODUCT_MODALITIES))
    q = queries.where(F.col("modality").isin(*QUERY_MODALITIES))
    return (_bad_rows(p, "product_id", "product_features", dims)
            .unionByName(_bad_rows(q, "query_id", "query_features", dims)))


def pivot(df: DataFrame, key: str, modalities: tuple[str, ...], dims: Mapping[str, int] | None = None,
          prefix: str = "") -> DataFrame:
    """One row per `key` with a `<prefix><modality>` embedding column per modality (null when missing or
    unusable: such an embedding is never trained on or scored)."""
    aggs = [F.first(F.when(F.col("modality") == m, F.col("embedding")), ignorenulls=True).alias(f"{prefix}{m}")
            for m in modalities]
    return df.where(F.col("modality").isin(*modalities) & usable(dims)).groupBy(key).agg(*aggs)


def product_feature_frame(products: DataFrame, dims: Mapping[str, int] | None = None) -> DataFrame:
    """product_id, p_text, p_image, p_audio from `product_features` rows."""
    return pivot(products, "product_id", PRODUCT_MODALITIES, dims, "p_")


def query_feature_frame(queries: DataFrame, dims: Mapping[str, int] | None = None) -> DataFrame:
    """query_id, q_text, q_audio from `query_features` rows."""
    return pivot(queries, "query_id", QUERY_MODALITIES, dims, "q_")


def usable_rows(df: DataFrame, key: str, modalities: tuple[str, ...], dims: Mapping[str, int] | None = None
                ) -> DataFrame:
    """(`key`, modality, embedding) rows of a feature table a model can use, for `modalities` only."""
    return df.where(F.col("modality").isin(*modalities) & usable(dims)).select(key, "modality", "embedding")


def with_presence(pairs: DataFrame, query_rows: DataFrame, product_rows: DataFrame) -> DataFrame:
    """(query_id, product_id) pairs with flags `_q` / `_p`: the query / product has a usable embedding (true or
    null), from `usable_rows` frames. Keys only: no embedding is joined onto a pair."""
    qids = query_rows.select("query_id").distinct().withColumn("_q", F.lit(True))
    pids = product_rows.select("product_id").distinct().withColumn("_p", F.lit(True))
    return pairs.join(qids, "query_id", "left").join(pids, "product_id", "left")


def coverage_counts(joined: DataFrame) -> dict[str, int]:
    """Pairs, and pairs / queries / products skipped for lack of features, of a `with_presence` frame."""
    no_q, no_p = F.col("_q").isNull(), F.col("_p").isNull()
    r = joined.agg(
        F.count(F.lit(1)).alias("pairs"), F.sum(F.when(no_q, 1).otherwise(0)).alias("no_q"),
        F.sum(F.when(no_p, 1).otherwise(0)).alias("no_p"),
        F.sum(F.when(no_q | no_p, 1).otherwise(0)).alias("skipped"),
        F.countDistinct(F.when(no_q, F.col("query_id"))).alias("q_missing"),
        F.countDistinct(F.when(no_p, F.col("product_id"))).alias("p_missing")).first()
    return {"candidate_pairs": int(r["pairs"] or 0), "pairs_scored": int((r["pairs"] or 0) - (r["skipped"] or 0)),
            "pairs_skipped_no_query_features": int(r["no_q"] or 0),
            "pairs_skipped_no_product_features": int(r["no_p"] or 0),
            "queries_skipped_no_features": int(r["q_missing"] or 0),
            "products_skipped_no_features": int(r["p_missing"] or 0)}


def scorable(joined: DataFrame) -> DataFrame:
    """The (query_id, product_id) pairs of a `with_presence` frame that can be scored."""
    return joined.where(F.col("_q") & F.col("_p")).select("query_id", "product_id")
