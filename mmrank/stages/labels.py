"""Stage `labels`: graded training labels per (query, product) from `query_log`, debiased for position.

Per impression the gain is purchase > add-to-cart > click > skip (`LabelsConf` gains). Examination
propensities per position are ESTIMATED FROM THE LOG with the position-based click model
P(click) = theta[position] * gamma[query, product] (identifiable because exploration sessions and ranker jitter
show the same pair at several positions), fitted by maximum likelihood in Spark tasks: only the ~20 position
parameters ever reach the driver. label = sum(gain) / sum(max(propensity, 1/clip)) over the pair's impressions
(self-normalised IPW: gain per expected examination), clipped to [0, gain_purchase]; `weight` = expected
examinations. Queries with judgments (not `generator_truth`) but no log get label = grade.

The fit (`fit_propensities`) is EM on theta with gamma profiled out: for a given theta each pair's gamma is its
exact maximiser (a concave 1-D problem, a few vectorised Newton steps inside the task that holds the pair's
rows), then theta takes the EM update sum(expected examinations) / impressions per position, accelerated with
SQUAREM (Varadhan & Roland 2008). Every evaluation is one Spark job over the pairs (grouped once and cached)
that returns per-position sums and the log-likelihood. The sums are EXACT: each pair's Newton steps stop on its own
convergence (never on a neighbour's) and every row's contribution is added as a fixed-point integer, so any
partitioning, local or on a cluster, gives the same bits. `pbm_propensities` runs the same fit in one process on
a pandas frame (tests, notebooks).
"""
from __future__ import annotations

import datetime as dt
from typing import Callable

import numpy as np
import pandas as pd
from pyspark import StorageLevel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from mmrank.config import LabelsConf
from mmrank.lakehouse import Lakehouse, sql_date
from mmrank.runs import StageRun
from mmrank.stages import stage

HIDDEN_SOURCES = ("generator_truth",)  # evaluation-only truth, never a training label
_LO, _HI = 1e-6, 1 - 1e-6              # bounds of theta and gamma
_NEWTON_STEPS = 50
_FIXED = 2.0 ** 24                     # fixed-point scale of the EM sums (integer addition is associative)

# one evaluation of the fit: theta [k] -> (expected examinations per position [k], log-likelihood), both x _FIXED
Evaluate = Callable[[np.ndarray], tuple[np.ndarray, int]]


def pair_relevance(t: np.ndarray, pair: np.ndarray, n: np.ndarray, c: np.ndarray, n_pairs: int) -> np.ndarray:
    """Per pair, the gamma maximising sum c log(t gamma) + (n - c) log(1 - t gamma) over its rows (t = theta of
    each row's position): vectorised Newton steps on the concave 1-D problems, clipped to (0, 1). A pair stops
    at its own convergence, so its gamma does not depend on which pairs share the batch."""
    clicks = np.bincount(pair, c, n_pairs)
    g = np.clip(clicks / np.maximum(np.bincount(pair, n * t, n_pairs), 1e-12), _LO, _HI)
    skips = n - c
    active = np.ones(n_pairs, bool)
    for _ in range(_NEWTON_STEPS):
        den = 1 - t * g[pair]
        d1 = clicks / g - np.bincount(pair, skips * t / den, n_pairs)
        d2 = -clicks / g ** 2 - np.bincount(pair, skips * t * t / den ** 2, n_pairs)
        new = np.where(active, np.clip(g - d1 / np.minimum(d2, -1e-12), _LO, _HI), g)
        active &= np.abs(new - g) >= 1e-10
        g = new
        if not active.any():
            break
    return g


def _fixed_sum(values: np.ndarray, index: np.ndarray, k: int) -> np.ndarray:
    """Per-index int64 sums of `values` in fixed point (x _FIXED): exact, so order and grouping do not matter."""
    out = np.zeros(k, np.int64)
    np.add.at(out, index, np.rint(values * _FIXED).astype(np.int64))
    return out


def em_sums(theta: np.ndarray, pos: np.ndarray, pair: np.ndarray, n: np.ndarray, c: np.ndarray,
            n_pairs: int) -> tuple[np.ndarray, int]:
    """(expected examined impressions per position [k], log-likelihood), both int64 x _FIXED, of rows (0-based
    position, pair index, impressions, clicks) under theta, each pair at its profiled gamma. Sums over disjoint
    sets of pairs add up exactly."""
    t = theta[pos]
    r = pair_relevance(t, pair, n, c, n_pairs)[pair]
    tr = t * r
    den = np.clip(1 - tr, 1e-9, None)
    examined = c + (n - c) * t * (1 - r) / den
    ll = c * np.log(tr) + (n - c) * np.log(den)
    return _fixed_sum(examined, pos, len(theta)), int(np.rint(ll * _FIXED).astype(np.int64).sum())


def fit_propensities(evaluate: Evaluate, n_pos: np.ndarray, max_evals: int = 60,
                     tol: float = 1e-4) -> np.ndarray:
    """Examination probability per position (index 0 = position 1, normalised so position 1 = 1.0).

    EM map theta -> examined / n_pos (gamma profiled out inside `evaluate`), accelerated by SQUAREM with a
    likelihood safeguard; stops when the normalised theta moves less than `tol` or after `max_evals`
    evaluations."""
    imp = np.maximum(np.asarray(n_pos, float), 1e-9)
    evals = 0

    def em(theta: np.ndarray) -> tuple[np.ndarray, float]:
        nonlocal evals
        evals += 1
        examined, ll = evaluate(theta)
        return np.clip(np.asarray(examined, float) / _FIXED / imp, _LO, 1.0), ll

    theta = np.full(len(imp), 0.5)
    while evals + 3 <= max_evals:
        t1, _ = em(theta)
        t2, ll2 = em(t1)
        r, v = t1 - theta, t2 - 2 * t1 + theta
        alpha = -max(1.0, float(np.linalg.norm(r) / max(np.linalg.norm(v), 1e-300)))
        jump = np.clip(theta - 2 * alpha * r + alpha ** 2 * v, _LO, 1.0)
        t3, ll3 = em(jump)
        new = t3 if ll3 >= ll2 else em(t2)[0]  # the extrapolation must not lower the likelihood
        done = np.abs(new / new[0] - theta / theta[0]).max() < tol
        theta = new
        if done:
            break
    return theta / theta[0]


def pbm_propensities(agg: pd.DataFrame, max_evals: int = 60, tol: float = 1e-4) -> np.ndarray:
    """`fit_propensities` in one process. `agg` has columns pair (any hashable), position (1-based),
    n (impressions), c (clicks)."""
    pos = agg["position"].to_numpy(int) - 1
    pair = pd.factorize(agg["pair"])[0]
    n, c = agg["n"].to_numpy(float), agg["c"].to_numpy(float)
    k, n_pairs = int(pos.max()) + 1, int(pair.max()) + 1
    return fit_propensities(lambda th: em_sums(th, pos, pair, n, c, n_pairs), np.bincount(pos, n, k),
                            max_evals, tol)


def position_stats(events: DataFrame, lc: LabelsConf) -> DataFrame:
    """Per (query, product, position): impressions, clicks, carts, purchases and summed gain."""
    gain = (F.when(F.col("purchased"), lc.gain_purchase).when(F.col("added_to_cart"), lc.gain_cart)
            .when(F.col("clicked"), lc.gain_click).otherwise(0.0))
    return (events.groupBy("query_id", "product_id", "position")
            .agg(F.count(F.lit(1)).alias("n"), F.sum(F.col("clicked").cast("long")).alias("c"),
                 F.sum(F.col("added_to_cart").cast("long")).alias("carts"),
                 F.sum(F.col("purchased").cast("long")).alias("purchases"), F.sum(gain).alias("gain")))


def _task_sums(theta: np.ndarray):
    """mapInArrow function: per partition of grouped pairs (pos, n, c arrays per row), one row per position
    with the summed expected examinations, plus position 0 carrying the log-likelihood."""
    import pyarrow as pa

    def run(batches):
        examined, ll = np.zeros(len(theta), np.int64), 0
        for b in batches:
            if not b.num_rows:
                continue
            lengths = b.column("pos").value_lengths().to_numpy(zero_copy_only=False)
            flat = {name: b.column(name).flatten().to_numpy(zero_copy_only=False) for name in ("pos", "n", "c")}
            pair = np.repeat(np.arange(b.num_rows), lengths)
            e, part_ll = em_sums(theta, flat["pos"].astype(np.int64) - 1, pair, flat["n"].astype(float),
                                 flat["c"].astype(float), b.num_rows)
            examined += e
            ll += part_ll
        yield pa.RecordBatch.from_arrays(
            [pa.array(np.arange(len(theta) + 1, dtype=np.int32)), pa.array(np.concatenate([[ll], examined]))],
            names=["position", "value"])
    return run


def estimate_propensities(stats: DataFrame, lc: LabelsConf | None = None) -> np.ndarray:
    """Propensities per position from `position_stats` rows, fitted in Spark tasks (see the module doc)."""
    lc = lc or LabelsConf()
    per_pos = {r["position"]: r["n"] for r in stats.groupBy("position").agg(F.sum("n").alias("n")).collect()}
    k = max(per_pos)
    n_pos = np.array([per_pos.get(p, 0) for p in range(1, k + 1)], float)
    pairs = (stats.groupBy("query_id", "product_id")
             .agg(F.sort_array(F.collect_list(F.struct("position", "n", "c"))).alias("s"))
             .select(F.col("s.position").alias("pos"), F.col("s.n").cast("array<double>").alias("n"),
                     F.col("s.c").cast("array<double>").alias("c"))
             .persist(StorageLevel.MEMORY_AND_DISK))

    def evaluate(theta: np.ndarray) -> tuple[np.ndarray, int]:
        # one row per partition and position: bounded by the partition count, not by the log
        v = [0] * (k + 1)
        for r in pairs.mapInArrow(_task_sums(theta), "position int, value long").collect():
            v[r["position"]] += r["value"]
        return np.array(v[1:], float), v[0]

    try:
        return fit_propensities(evaluate, n_pos, lc.em_max_evals, lc.em_tol)
    finally:
        pairs.unpersist()


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
    theta = estimate_propensities(stats, lh.cfg.labels) if lh.cfg.labels.propensity == "ipw" and stats.count() else None
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
