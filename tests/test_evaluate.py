"""evaluate stage: metrics rows for every model, value ranges, report files, metric wiring (oracle = 1.0)."""
from __future__ import annotations

import json

import pytest
from pyspark.sql import functions as F

from _toy_lists import RUN_DATE, write_toy
from conftest import make_config
from mmrank.stages import evaluate, training_lists
from mmrank.lakehouse import Lakehouse


@pytest.fixture(scope="module")
def evaluated(spark, tmp_path_factory):
    from mmrank.ranker.artifact import save_artifact
    from mmrank.ranker.fit import train_local

    lh = Lakehouse(spark, make_config(tmp_path_factory.mktemp("eval"), "train.list_size=10",
                                      "train.max_epochs=2", "evaluate.lgbm_params={n_estimators: 20}"))
    write_toy(lh, n_queries=40, n_cands=10, seed=1)
    judged = lh.read("labels").selectExpr("query_id", "product_id", "label AS grade", "'toy' AS source",
                                          "run_date")
    lh.overwrite("judgments", judged)  # judgments == labels: test_judgments must equal test
    training_lists.run(lh, RUN_DATE)
    dims = training_lists.list_dims(lh)
    train = training_lists.load_split(lh, "train")
    model, _ = train_local(train, train, dims, lh.cfg.train)
    version = save_artifact(model, {}, lh.paths.artifacts)
    extra = {"oracle": lambda b: b["grades"].numpy(), "anti_oracle": lambda b: -b["grades"].numpy()}
    counts = evaluate.run(lh, RUN_DATE, dataset="toy", extra=extra)
    rows = lh.read("metrics").toPandas()
    return lh, counts, rows, version


def test_every_model_has_metrics_in_range(evaluated):
    _, counts, rows, version = evaluated
    expected = {"fusion", "similarity", "gated_fusion", "concat_fusion", "text_only", "image_only",
                "audio_only", "lightgbm_lambdamart", "oracle", "anti_oracle"}
    assert set(rows["model_name"]) == expected and counts["models"] == len(expected)
    assert not rows.duplicated(["model_name", "split", "metric", "k"]).any()
    assert (rows["dataset"] == "toy").all() and set(rows["split"]) == {"test", "test_judgments"}
    assert rows.loc[rows["model_name"] == "fusion", "model_version"].eq(version).all()
    per_model = rows.groupby(["model_name", "split"])["metric"].apply(set)
    assert all(s == {"ndcg", "dcg", "map", "mrr"} for s in per_model)
    bounded = rows[rows["metric"].isin(["ndcg", "map", "mrr"])]["value"]
    assert bounded.between(0, 1).all()
    assert set(rows.loc[rows["metric"] == "ndcg", "k"]) == {5, 10}


def test_oracle_scores_one_and_anti_oracle_less(evaluated):
    rows = evaluated[2][evaluated[2]["split"] == "test"].set_index(["model_name", "metric", "k"])["value"]
    for k in (5, 10):
        assert rows[("oracle", "ndcg", k)] == pytest.approx(1.0)
        assert rows[("anti_oracle", "ndcg", k)] < 0.9
    assert rows[("oracle", "mrr", None)] == pytest.approx(1.0)


def test_judgment_grades_match_when_judgments_equal_labels(evaluated):
    rows = evaluated[2].fillna({"k": -1}).set_index(["model_name", "metric", "k", "split"])["value"].unstack()
    assert rows["test"].to_numpy() == pytest.approx(rows["test_judgments"].to_numpy())


def test_report_files(evaluated):
    lh = evaluated[0]
    out = lh.paths.reports(RUN_DATE)
    md, png, js = out / "evaluation_toy.md", out / "evaluation_toy.png", out / "metrics_toy.json"
    assert md.exists() and png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    assert "| lightgbm_lambdamart |" in md.read_text() and "ndcg@10" in md.read_text()
    assert len(json.loads(js.read_text())["metrics"]) == len(evaluated[2])


def test_cheap_mode_and_dataset_isolation(evaluated, spark):
    lh = evaluated[0]
    cheap = Lakehouse(spark, lh.cfg.model_copy(update={"evaluate": lh.cfg.evaluate.model_copy(
        update={"baselines": False})}))
    evaluate.run(cheap, RUN_DATE, dataset="toy_cheap")
    evaluate.run(cheap, RUN_DATE, dataset="toy_cheap")  # re-run replaces (run_date, dataset), never duplicates
    rows = lh.read("metrics").where(F.col("dataset") == "toy_cheap").toPandas()
    assert set(rows["model_name"]) == {"fusion", "similarity"} and len(rows) == 2 * 2 * 6
    assert lh.read("metrics").where(F.col("dataset") == "toy").count() == len(evaluated[2])
    with pytest.raises(ValueError):
        evaluate.run(lh, RUN_DATE, dataset="x'; drop")
