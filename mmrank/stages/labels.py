"""Stage `labels`: graded training labels per (query, product) from `query_log`, debiased for position.

Per impression the gain is purchase > add-to-cart > click > skip (`LabelsConf` gains). Examination
propensities per position are ESTIMATED FROM THE LOG with the position-based click model (EM over
(query, product, position) click counts; identifiable because exploration sessions and ranker jitter show the
same pair at several positions). label = sum(gain) / sum(max(propensity, 1/clip)) over the pair's impressions
(self-normalised IPW: gain per expected examination), clipped to [0, gain_purchase]; `weight` = expected
examinations. Queries with judgments (not `generator_truth`) but no log get label = grade.
"""
from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from mmrank.config import LabelsConf
from mmrank.lakehouse import Lakehouse, sql_date
from mmrank.runs import StageRun
from mmrank.stages import stage

HIDDEN_SOURCES = ("generator_truth",)  # evaluation-only truth, never a training label


def pbm_propensities(agg: pd.DataFrame, n_iter: int = 100, tol: float = 1e-6) -> np.ndarray:
    """Examination probability per position (index 0 = position 1, normalised so position 1 = 1.0).

    `agg` has columns pair (any hashable), position (1-based), n (impressions), c (clicks). EM for
    P(click) = theta[position] * gamma[pair] (Wang et al. 2018, regression-free)."""
    pos = agg["position"].to_numpy(int) - 1
    pair = pd.factorize(agg["pair"])[0]
    n, c = agg["n"].to_numpy(float), agg["c"].to_numpy(float)
    k = pos.max() + 1
    theta, gamma = np.full(k, 0.5), np.full(pair.max() + 1, 0.5)
    n_pos, n_pair = np.bincount(pos, n, k), np.bincount(pair, n)
    for _ in range(n_iter):
        t, r = theta[pos], gamma[pair]
        denom = np.clip(1 - t * r, 1e-9, None)
        e = c + (n - c) * t * (1 - r) / denom          # expected examined count
        rel = c + (n - c) * (1 - t) * r / denom        # expected relevant count
        new_theta = np.clip(np.bincount(pos, e, k) / np.maximum(n_pos, 1e-9), 1e-6, 1)
        gamma = np.clip(np.bincount(pair, rel) / np.maximum(n_pair, 1e-9), 1e-6, 1 - 1e-6)
        done = np.max(np.abs(new_theta - theta)) < tol
        theta = new_theta
        if done:
            break
    return theta / theta[0]


def position_stats(events: DataFrame, lc: LabelsConf) -> DataFrame:
    """Per (query, product, position): impressions, clicks, carts, purchases and summed gain."""
    gain = (F.when(F.col("purchased"), lc.gain_purchase).when(F.col("added_to_cart"), lc.gain_cart)
            .when(F.col("clicked"), lc.gain_click).otherwise(0.0))
    return (events.groupBy("query_id", "product_id", "position")
            .agg(F.count(F.lit(1)).alias("n"), F.sum(F.col("clicked").cast("long")).alias("c"),
                 F.sum(F.col("added_to_cart").cast("long")).alias("carts"),
                 F.sum(F.col("purchased").cast("long")).alias("purchases"), F.sum(gain).alias("gain")))


def estimate_propensities(stats: DataFrame) -> np.ndarray:
    # sorted: EM's sums then run in one order whatever the partitioning, so every cluster gets the same bits
    pdf = (stats.select("query_id", "product_id", "position", "n", "c").toPandas()
           .sort_values(["query_id", "product_id", "position"], kind="stable", ignore_index=True))
    pdf["pair"] = pdf["query_id"] + "\u241f" + pdf["product_id"]
    return pbm_propensities(pdf)


def log_labels(lh: Lakehouse, stats: DataFrame, theta: np.ndarray | None) -> DataFrame:
    """Self-normalised IPW labels (theta given) or raw mean gain (theta None) per (query, product):
    label = sum(gain) / sum(max(theta[position], 1/propensity_clip)) = gain per expected examination."""
    lc = lh.cfg.labels
    if theta is None:
        exam, clipped, src = F.lit(1.0), F.lit(1.0), "log_raw"
    else:
        pos = lh.spark.createDataFrame(pd.DataFrame({"position": np.arange(1, len(theta) + 1, dtype=np.int32),
                                                     "theta": theta.astype(float)}))
        stats = stats.join(F.broadcast(pos), "position", "left").fillna({"theta": float(theta[-1])})
        exam, src = F.col("theta"), "log_ipw"
        clipped = F.greatest(exam, F.lit(1.0 / lc.propensity_clip))
    # the examination sums add up fractions: summed in position order (not shuffle order) so that every
    # partitioning, local or on a cluster, gives the same bits
    per_pos = F.array_sort(F.collect_list(F.struct("position", (F.col("n") * clipped).alias("e"),
                                                   (F.col("n") * exam).alias("w"))))
    return (stats.groupBy("query_id", "product_id").agg(
        F.sum("gain").alias("g"), per_pos.alias("per_pos"), F.sum("n").alias("impressions"),
        F.sum("c").alias("clicks"), F.sum("carts").alias("carts"), F.sum("purchases").alias("purchases"))
        .withColumn("exam", F.aggregate("per_pos", F.lit(0.0), lambda acc, x: acc + x["e"]))
        .withColumn("weight", F.aggregate("per_pos", F.lit(0.0), lambda acc, x: acc + x["w"]))
        .where(F.col("impressions") >= lc.min_impressions)
        .select("query_id", "product_id", F.least(F.col("g") / F.col("exam"), F.lit(lc.gain_purchase)).alias("label"),
                "weight", "impressions", "clicks", "carts", "purchases", F.lit(src).alias("source")))


def judgment_labels(lh: Lakehouse, logged_queries: DataFrame) -> DataFrame:
    """label = grade for queries that have judgments but no log (highest grade if several sources)."""
    j = lh.read("judgments").where(~F.col("source").isin(*HIDDEN_SOURCES))
    j = j.join(logged_queries, "query_id", "left_anti")
    return (j.groupBy("query_id", "product_id").agg(F.max("grade").alias("label"), F.min("source").alias("s"))
            .select("query_id", "product_id", "label", F.lit(1.0).alias("weight"),
                    *[F.lit(None).cast("long").alias(c) for c in ("impressions", "clicks", "carts", "purchases")],
                    F.concat(F.lit("judgments:"), F.col("s")).alias("source")))


def build_labels(lh: Lakehouse, run_date: dt.date) -> tuple[DataFrame, np.ndarray | None]:
    """Labels DataFrame (contract columns) from the log up to run_date, plus the propensities used."""
    events = lh.read("query_log").where(f"run_date <= DATE'{sql_date(run_date)}'")
    stats = position_stats(events, lh.cfg.labels).cache()
    theta = estimate_propensities(stats) if lh.cfg.labels.propensity == "ipw" and stats.count() else None
    logged = events.select("query_id").distinct()
    df = log_labels(lh, stats, theta).unionByName(judgment_labels(lh, logged))
    return df.withColumn("run_date", F.lit(sql_date(run_date)).cast("date")), theta


@stage("labels", inputs=("query_log", "judgments"), outputs=("labels",))
def run(lh: Lakehouse, run_date: dt.date, rec: StageRun) -> dict[str, int]:
    """Stage `labels`: rebuild the `labels` table (one overwrite commit) for run_date."""
    df, theta = build_labels(lh, run_date)
    lh.overwrite("labels", df)
    out = lh.read("labels").groupBy("source").count().collect()
    counts = {f"labels_{r['source'].replace(':', '_')}": r["count"] for r in out}
    counts["labels"] = sum(r["count"] for r in out)
    if theta is not None:
        rec.message = "propensity=" + ",".join(f"{t:.3f}" for t in theta)
    return counts
