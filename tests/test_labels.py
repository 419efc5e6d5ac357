"""Labels from logs: propensities estimated from the log, and IPW labels beat raw clicks at recovering truth."""
from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest
from scipy.stats import kendalltau

from conftest import make_config
from mmrank.stages import labels
from mmrank.data import generator as gen
from mmrank.lakehouse import Lakehouse

RUN_DATE = dt.date(2026, 11, 21)


def _ndcg(scores: np.ndarray, grades: np.ndarray, k: int = 10) -> float:
    gains = 2.0 ** grades - 1
    disc = 1 / np.log2(np.arange(2, k + 2))
    ideal = (np.sort(gains)[::-1][:k] * disc[:min(k, len(gains))]).sum()
    order = np.lexsort((np.arange(len(scores)), -scores))  # ties broken by candidate order, not by grade
    return float((gains[order][:k] * disc[:min(k, len(gains))]).sum() / ideal) if ideal > 0 else np.nan


def _quality(df: pd.DataFrame, col: str) -> tuple[float, float]:
    taus, ndcgs = [], []
    for _, g in df.groupby("query_id"):
        taus.append(kendalltau(g[col], g["grade"]).statistic)
        ndcgs.append(_ndcg(g[col].to_numpy(float), g["grade"].to_numpy(float)))
    return float(np.nanmean(taus)), float(np.nanmean(ndcgs))


@pytest.fixture(scope="module")
def logged(spark, tmp_path_factory):
    """A generated log (no media) written straight into query_log, plus the generator truth."""
    cfg = make_config(tmp_path_factory.mktemp("labels"), "generator.n_products=200", "generator.n_queries=60",
                      "generator.sessions_per_query=100", "generator.ranker_noise=1.5")
    lh = Lakehouse(spark, cfg)
    data = gen.generate_tables(cfg.generator, RUN_DATE)
    log = data.log.assign(run_date=data.log["event_ts"].dt.date, position=data.log["position"].astype("int32"))
    lh.replace("query_log", spark.createDataFrame(log), "true")
    return lh, data


def test_propensities_are_estimated_from_the_log_in_spark_tasks(logged):
    """The fit in Spark tasks (pairs spread over partitions, per-position sums added up) recovers the simulated
    examination curve, gives the same bits whatever the partitioning (a cluster and local[2] must write the same
    labels) and equals the same fit run in one process."""
    lh, _ = logged
    stats = labels.position_stats(lh.read("query_log"), lh.cfg.labels)
    theta = labels.estimate_propensities(stats.repartition(3), lh.cfg.labels)
    assert np.array_equal(theta, labels.estimate_propensities(stats.repartition(1), lh.cfg.labels))
    true = (1.0 / np.arange(1, len(theta) + 1)) ** lh.cfg.generator.position_bias_eta
    assert theta[0] == 1.0
    assert np.abs(theta[:10] - true[:10]).max() < 0.05, theta[:10].round(3)
    pdf = stats.toPandas().assign(pair=lambda d: d["query_id"] + "/" + d["product_id"])
    np.testing.assert_allclose(theta, labels.pbm_propensities(pdf), rtol=1e-7)


def test_ipw_labels_recover_truth_better_than_raw_clicks(logged):
    lh, data = logged
    counts = labels.run(lh, RUN_DATE)
    lab = lh.read("labels").toPandas()
    assert counts["labels"] == len(lab) == len(data.truth) and set(lab["source"]) == {"log_ipw"}
    assert lab["label"].between(0, lh.cfg.labels.gain_purchase).all()
    df = data.truth.merge(lab, on=["query_id", "product_id"])
    df["ctr"] = df["clicks"] / df["impressions"]
    ipw, clicks, ctr = (_quality(df, c) for c in ("label", "clicks", "ctr"))
    print(f"\nkendall tau / NDCG@10 vs truth: ipw {ipw}, raw clicks {clicks}, raw ctr {ctr}")
    assert ipw[1] > max(clicks[1], ctr[1]) + 0.005  # NDCG@10: debiased labels put the truly best on top
    assert ipw[0] > max(clicks[0], ctr[0]) - 0.01   # Kendall tau: at least as good over the whole list
    run = lh.read("runs").where("stage = 'labels'").first()
    assert run["status"] == "succeeded" and run["message"].startswith("propensity=")
