"""evaluate stage: metrics rows for every model, value ranges, report files, metric wiring (oracle = 1.0)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from pyspark.sql import functions as F

from _toy_lists import RUN_DATE, write_toy
from conftest import make_config
from mmrank.stages import evaluate, training_lists
from mmrank.lakehouse import Lakehouse


def _judged_grade(product_id: str) -> float | None:
    """Independent judgments, a fixed function of the candidate's slot j in `write_toy` that disagrees with the
    labels (which make j % 3 == 0 relevant): j % 3 == 1 judged relevant (grade 1..3), j % 3 == 0 judged
    irrelevant, j % 3 == 2 never judged (must count as 0)."""
    j = int(product_id.rsplit("_p", 1)[1])
    return {0: 0.0, 1: float(1 + (j // 3) % 3)}.get(j % 3)


def _judgments(lh: Lakehouse):
    """`judgments` rows for every labelled pair that `_judged_grade` judges; relevant pairs also get a second,
    lower grade from another source (evaluation takes the max over sources)."""
    rows = []
    for r in lh.read("labels").where(F.col("query_id") != "q_nofeat").select("query_id", "product_id").collect():
        g = _judged_grade(r.product_id)
        if g is None:
            continue
        rows.append((r.query_id, r.product_id, g, "toy", RUN_DATE))
        if g > 0:
            rows.append((r.query_id, r.product_id, 0.0, "toy_second_opinion", RUN_DATE))
    return lh.spark.createDataFrame(rows, schema=lh.read("judgments").schema)


def _lookup_scorer(frame, grade_of):
    """Scores [B, L] for the lists of `frame` (rows in the order evaluation batches them: by query_id) from a
    per-pair lookup; padding gets -inf."""
    L = len(frame["grades"].iloc[0])
    out = np.full((len(frame), L), -np.inf)
    for i, (q, pids) in enumerate(zip(frame["query_id"], frame["product_ids"])):
        out[i, :len(pids)] = [grade_of(q, p) for p in pids]

    def score(b):
        assert tuple(b["grades"].shape) == out.shape
        return out
    return score


@pytest.fixture(scope="module")
def evaluated(spark, tmp_path_factory):
    from mmrank.ranker.artifact import save_artifact
    from mmrank.ranker.fit import train_local

    lh = Lakehouse(spark, make_config(tmp_path_factory.mktemp("eval"), "train.list_size=10",
                                      "train.max_epochs=2", "evaluate.lgbm_params={n_estimators: 20}"))
    write_toy(lh, n_queries=80, n_cands=10, seed=1)
    lh.overwrite("judgments", _judgments(lh))
    training_lists.run(lh, RUN_DATE)
    dims = training_lists.list_dims(lh)
    train = training_lists.load_split(lh, "train")
    # the evaluated artifact is trained long enough to learn the toy signal (tiny lists: milliseconds per
    # epoch); the baselines evaluate.run trains keep the cheap train.max_epochs=2
    model, _ = train_local(train, train, dims, lh.cfg.train.model_copy(update={"max_epochs": 30}))
    version = save_artifact(model, {}, lh.paths.artifacts)
    test = training_lists.read_split(lh, "test")
    extra = {"oracle": lambda b: b["grades"].numpy(), "anti_oracle": lambda b: -b["grades"].numpy(),
             "judgment_oracle": _lookup_scorer(test, lambda q, p: _judged_grade(p) or 0.0),
             "constant": lambda b: np.zeros(tuple(b["grades"].shape))}
    counts = evaluate.run(lh, RUN_DATE, dataset="toy", extra=extra)
    rows = lh.read("metrics").toPandas()
    return lh, counts, rows, version, test


def test_every_model_has_metrics_in_range(evaluated):
    _, counts, rows, version, _ = evaluated
    expected = {"fusion", "similarity", "gated_fusion", "concat_fusion", "text_only", "image_only",
                "audio_only", "lightgbm_lambdamart", "oracle", "anti_oracle", "judgment_oracle", "constant"}
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


def _by_split(rows):
    return rows.fillna({"k": -1}).set_index(["model_name", "metric", "k", "split"])["value"].unstack()


def test_judgment_metrics_are_computed_from_the_judgments(evaluated):
    """`test_judgments` grades come from `judgments` (max over sources, unjudged candidate = 0), not from the
    labels: an oracle of the judgments is perfect there and not on `test`, the label oracle the other way
    round, and a model's metrics differ between the two targets."""
    test = evaluated[4]
    labels = np.concatenate([np.asarray(g)[:n] for g, n in zip(test["grades"], test["list_len"])])
    judged = np.array([_judged_grade(p) or 0.0 for pids in test["product_ids"] for p in pids])
    assert len(test) >= 3 and (labels > 0).any() and (judged > 0).any()
    assert ((labels > 0) != (judged > 0)).mean() > 0.3   # the two targets really disagree
    v = _by_split(evaluated[2])
    assert set(v.columns) == {"test", "test_judgments"}
    for k in (5, 10):
        assert v.loc[("judgment_oracle", "ndcg", k), "test_judgments"] == pytest.approx(1.0)
        assert v.loc[("judgment_oracle", "ndcg", k), "test"] < 0.9
        assert v.loc[("oracle", "ndcg", k), "test"] == pytest.approx(1.0)
        assert v.loc[("oracle", "ndcg", k), "test_judgments"] < 0.9
    assert v.loc[("judgment_oracle", "mrr", -1), "test_judgments"] == pytest.approx(1.0)
    assert v.loc[("judgment_oracle", "map", -1), "test_judgments"] == pytest.approx(1.0)
    assert (v["test"] - v["test_judgments"]).abs().max() > 0.1


def test_trained_model_beats_a_constant_scorer(evaluated):
    """Evaluation can tell a model that learned nothing: equal scores for every candidate rank below `fusion`."""
    v = _by_split(evaluated[2])["test"]
    assert v[("fusion", "ndcg", 10)] > v[("constant", "ndcg", 10)] + 0.05
    assert v[("constant", "ndcg", 10)] < v[("oracle", "ndcg", 10)]


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


def test_metrics_summed_in_spark_tasks_equal_the_driver_computation(evaluated):
    """The per-(model, target, metric) sums added up across Spark tasks give the means `evaluate_lists`
    computes on the whole test split in one process (similarity prior, both no-relevant rules)."""
    from mmrank.ranker.baselines import similarity_scores
    from mmrank.ranker.metrics import evaluate_lists, has_relevant, per_list_metrics

    lh, _, rows, *_ = evaluated
    test = training_lists.load_split(lh, "test")
    want = evaluate_lists(similarity_scores(test), test["grades"].numpy(), lh.cfg.evaluate.ks,
                          lh.cfg.evaluate.no_relevant)
    got = rows[(rows["model_name"] == "similarity") & (rows["split"] == "test")]
    for r in got.itertuples():
        key = r.metric if r.k is None or r.k != r.k else f"{r.metric}@{int(r.k)}"
        assert r.value == pytest.approx(want[key], rel=1e-9), key
    scores, grades = similarity_scores(test), test["grades"].numpy()
    hr = has_relevant(grades)
    for rule in ("skip", "zero", "one"):
        for key, v in per_list_metrics(scores, grades, [5]).items():
            if key.startswith("dcg"):
                continue
            ref = evaluate_lists(scores, grades, [5], rule)[key]
            assert evaluate.mean_of(float(v[hr].sum()), int(hr.sum()), len(v), rule) == pytest.approx(ref), rule
    assert np.isnan(evaluate.mean_of(0.0, 0, 3, "skip"))


def test_baselines_follow_the_schedule(evaluated, spark):
    """Baselines are due unless the dataset has baseline metrics in the previous every_days - 1 days; the
    run_date's own rows never count (a re-run of a date evaluates what its first run did)."""
    import datetime as dt

    lh = evaluated[0]
    d = RUN_DATE
    assert evaluate.baselines_due(lh, d, "toy")[0]  # its own rows do not count
    for later, due in ((1, False), (6, False), (7, True)):
        assert evaluate.baselines_due(lh, d + dt.timedelta(days=later), "toy")[0] is due, later
    assert evaluate.baselines_due(lh, d + dt.timedelta(days=1), "other")[0]  # per dataset
    off = Lakehouse(spark, lh.cfg.model_copy(update={"evaluate": lh.cfg.evaluate.model_copy(
        update={"baselines": False})}))
    assert not evaluate.baselines_due(off, d + dt.timedelta(days=30), "toy")[0]


def test_shipped_models_are_the_scored_and_the_previous_version(evaluated, spark, tmp_path):
    """`fusion` is what the score stage used for the date (int8 included), `fusion_previous` the artifact
    saved before it."""
    import datetime as dt

    from mmrank.config import TrainConf
    from mmrank.ranker.artifact import save_artifact
    from mmrank.ranker.fit import build_model
    from mmrank.stages import track_stage

    base = evaluated[0]
    lh = Lakehouse(spark, base.cfg.model_copy(update={"storage": base.cfg.storage.model_copy(
        update={"artifacts_dir": str(tmp_path / "artifacts")})}))
    dims = training_lists.list_dims(lh)
    first, second = (save_artifact(build_model(dims, TrainConf(seed=s)), {}, lh.paths.artifacts,
                                   now=dt.datetime(2030, 1, s, tzinfo=dt.timezone.utc)) for s in (1, 2))
    d = RUN_DATE + dt.timedelta(days=2)
    evaluate.run(lh, d, dataset="ship", baselines=False)
    rows = lh.read("metrics").where(F.col("dataset") == "ship").toPandas()
    versions = rows.groupby("model_name")["model_version"].first().to_dict()
    assert versions == {"fusion": second, "fusion_previous": first, "similarity": "unsupervised"}
    with track_stage(lh, "score", d) as rec:
        rec.model_version = first + "+int8"
    evaluate.run(lh, d, dataset="ship", baselines=False)
    rows = lh.read("metrics").where(F.col("dataset") == "ship").toPandas()
    assert rows.groupby("model_name")["model_version"].first().to_dict() == {
        "fusion": first + "+int8", "similarity": "unsupervised"}
