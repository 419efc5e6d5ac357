"""The writer of scoring: rank the scored pairs per query, keep the top N, shape `ranking_scores` rows."""
from __future__ import annotations

import datetime as dt

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from mmrank.lakehouse import sql_date


def rank_top_n(scored: DataFrame, top_n: int) -> DataFrame:
    """rank 1..N per query by score descending, ties broken by product_id ascending; keep rank <= top_n."""
    w = Window.partitionBy("query_id").orderBy(F.col("score").desc(), F.col("product_id").asc())
    return scored.withColumn("rank", F.row_number().over(w)).where(F.col("rank") <= top_n)


def ranking_rows(scored: DataFrame, top_n: int, run_date: dt.date, model_version: str) -> DataFrame:
    """`ranking_scores` rows of run_date: the top `top_n` of each query, with the model version."""
    return rank_top_n(scored, top_n).select(
        F.lit(sql_date(run_date)).cast("date").alias("run_date"), "query_id", "product_id", "score", "rank",
        F.lit(model_version).alias("model_version"), "contrib_text", "contrib_image", "contrib_audio")


def written_counts(scores: DataFrame, run_date: dt.date) -> dict[str, int]:
    """Rows and queries of run_date in a `ranking_scores` table."""
    day = scores.where(F.col("run_date") == F.lit(sql_date(run_date)).cast("date"))
    r = day.agg(F.count(F.lit(1)).alias("rows"), F.countDistinct("query_id").alias("queries")).first()
    return {"rows_written": int(r["rows"] or 0), "queries_ranked": int(r["queries"] or 0)}
