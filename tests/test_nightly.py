"""Nightly pipeline (issue #7): stage order, runs rows, resume/skip, --from-stage, failure exit, train-when-due,
the whole pipeline on a tiny sample, and the nightly report."""
from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest
from pyspark.sql import functions as F

from mmrank import nightly
from mmrank.lakehouse import Lakehouse
from mmrank.runs import stage_status
from mmrank.stages import stage, track_stage
from mmrank.stages.train import train_due
from tests.conftest import make_config

D1 = dt.date(2026, 11, 20)


def _fake_stages(calls: list, fail: set | None = None) -> list[nightly.Step]:
    """Stages `a`..`d` built like the real ones (the `stage` decorator) that record their call."""
    fail = fail if fail is not None else set()

    def make(name):
        @stage(name)
        def run(lh, run_date, rec):
            calls.append(name)
            if name in fail:
                raise RuntimeError(f"{name} exploded")
            return {"items": len(calls)}
        return nightly.Step(run.stage, lambda lh, d, o: run(lh, d))

    return [make(n) for n in "abcd"]


def _runs(lh) -> pd.DataFrame:
    return lh.read("runs").toPandas().set_index("stage").sort_index()


def test_resume_skip_from_stage_and_failure(lh):
    calls: list = []
    out: list[str] = []
    res = nightly.run_nightly(lh, D1, steps=_fake_stages(calls), echo=out.append)
    assert calls == ["a", "b", "c", "d"] and res.ran == ["a", "b", "c", "d"]
    runs = _runs(lh)
    assert (runs["status"] == "succeeded").all() and set(runs.index) == {"a", "b", "c", "d"}
    assert runs.loc["d", "counts"] == {"items": 4}
    assert any(line.startswith("[2/4] b ... done in") for line in out)

    calls.clear()
    res = nightly.run_nightly(lh, D1, steps=_fake_stages(calls), echo=out.append)
    assert calls == [] and res.skipped == ["a", "b", "c", "d"]

    nightly.run_nightly(lh, D1, nightly.NightlyOptions(from_stage="c"), steps=_fake_stages(calls), echo=print)
    assert calls == ["c", "d"]

    # b fails: failed row, StageFailed naming it, later stages not run
    calls.clear()
    with pytest.raises(nightly.StageFailed, match=r"\[2/4\] b failed: RuntimeError: b exploded"):
        nightly.run_nightly(lh, D1, nightly.NightlyOptions(rerun=True), steps=_fake_stages(calls, {"b"}),
                            echo=print)
    assert calls == ["a", "b"]
    assert stage_status(lh, D1, "b") == "failed"
    assert "b exploded" in _runs(lh).loc["b", "message"]
    # resume: a is done, b onwards run
    calls.clear()
    nightly.run_nightly(lh, D1, steps=_fake_stages(calls), echo=print)
    assert calls == ["b", "c", "d"]


def test_cli_exit_code_names_failed_stage(lh, monkeypatch, capsys, tmp_path):
    from mmrank.cli import job_parser, run_job

    calls: list = []
    monkeypatch.setattr(nightly, "PIPELINE", tuple(_fake_stages(calls, {"c"})))
    parser = job_parser("nightly")
    nightly.add_arguments(parser)
    root = lh.cfg.resolve_path(lh.cfg.storage.root)
    argv = ["--run-date", D1.isoformat(), "--set", f"storage.root={root}"]
    rc = run_job(parser, nightly.main, argv)
    assert rc == 1
    assert "stage [3/4] c failed" in capsys.readouterr().err
    assert stage_status(lh, D1, "c") == "failed"
    # a bad config is refused before anything runs (exit 2)
    assert run_job(parser, nightly.main, argv + ["--set", "score.top_n=0"]) == 2


def test_train_due(lh):
    from mmrank.config import TrainConf
    from mmrank.ranker.artifact import save_artifact
    from mmrank.modalities import ModalityDims
    from mmrank.ranker.fit import build_model

    due, reason, v = train_due(lh, D1)
    assert due and reason == "no model yet" and v is None
    model = build_model(ModalityDims(4, 4, 4), TrainConf(proj_dim=4, hidden_dim=4))
    version = save_artifact(model, {"run_date": D1.isoformat()}, lh.paths.artifacts)
    due, reason, v = train_due(lh, D1)
    assert not due and reason.startswith("not due") and v == version
    assert train_due(lh, D1 + dt.timedelta(days=1))[0]  # train_every_days = 1
    assert train_due(lh, D1, force=True)[0]


def _hashable(v):
    if isinstance(v, np.ndarray):
        v = v.tolist()
    if isinstance(v, dict):
        return tuple(sorted((k, _hashable(x)) for k, x in v.items()))
    if isinstance(v, (list, tuple)):
        return tuple(_hashable(x) for x in v)
    return v


def _snapshot(lh, names) -> dict[str, pd.DataFrame]:
    """Sorted pandas copy of each table (arrays/maps as tuples; load timestamps dropped)."""
    out = {}
    for n in names:
        df = lh.read(n)
        pdf = df.drop(*[c for c in ("ingested_at",) if c in df.columns]).toPandas()
        for c in pdf.columns:
            pdf[c] = pdf[c].map(_hashable)
        keys = [c for c in pdf.columns if pdf[c].map(lambda v: v is None or isinstance(v, (str, int, float))).all()]
        out[n] = pdf.sort_values(keys).reset_index(drop=True)
    return out


@pytest.mark.slow
def test_full_nightly_twice_is_idempotent(spark, tmp_path):
    cfg = make_config(tmp_path, "generator.n_products=60", "generator.n_queries=10", "train.max_epochs=2",
                      "train.data_loader=parquet", "score.top_n=5", "score.similarity_top_k=5",
                      "evaluate.baselines=false")
    lh = Lakehouse(spark, cfg)
    out: list[str] = []
    res = nightly.run_nightly(lh, D1, echo=out.append)
    assert res.failed is None and res.ran == list(nightly.STAGE_NAMES)
    runs = lh.read("runs").where(F.col("run_date") == F.lit(D1.isoformat()).cast("date")).toPandas()
    assert set(runs["stage"]) == set(nightly.STAGE_NAMES) and (runs["status"] == "succeeded").all()
    score_row = runs.set_index("stage").loc["score"]
    assert score_row["model_version"] and score_row["counts"]["rows_written"] > 0
    assert score_row["input_versions"]  # Delta versions of the inputs were recorded
    assert res.report_path and "ranking_scores" in "\n".join(out)
    tables = ["ranking_scores", "product_features", "labels", "metrics", "training_lists"]
    before = _snapshot(lh, tables)
    runs_before = runs.set_index("stage")["run_id"].to_dict()

    res2 = nightly.run_nightly(lh, D1, echo=print)
    assert res2.ran == [] and res2.skipped == list(nightly.STAGE_NAMES)
    after = _snapshot(lh, tables)
    for n in tables:
        pd.testing.assert_frame_equal(before[n], after[n])
    runs2 = lh.read("runs").where(F.col("run_date") == F.lit(D1.isoformat()).cast("date")).toPandas()
    assert runs2.set_index("stage")["run_id"].to_dict() == runs_before


def test_report_aggregates_metrics_scores_and_contributions(lh):
    from pyspark.sql import Row

    from mmrank import report
    from mmrank.interactive import contribution_table

    mrows = [Row(run_date=d, model_version=f"v{i}", model_name=name, dataset="sample", split="test",
                 metric=metric, k=k, value=val + 0.01 * i)
             for i, d in enumerate((D1 - dt.timedelta(days=1), D1))
             for name, val in (("fusion", 0.7), ("text_only", 0.6), ("image_only", 0.4))
             for metric, k in (("ndcg", 5), ("ndcg", 10), ("mrr", None))]
    lh.overwrite("metrics", lh.spark.createDataFrame(mrows, lh.read("metrics").schema))
    srows = [Row(run_date=D1, query_id=f"q{q}", product_id=f"p{p}", score=float(5 - r), rank=r + 1,
                 model_version="v1", contrib_text=0.5, contrib_image=0.1 * r, contrib_audio=0.0 if p % 2 else -0.2)
             for q in range(3) for r, p in enumerate(range(q, q + 5))]
    lh.replace_date("ranking_scores", lh.spark.createDataFrame(srows, lh.read("ranking_scores").schema), D1)
    with track_stage(lh, "score", D1) as rec:
        rec.counts["rows_written"] = len(srows)
    today = lh.read("metrics").where(F.col("run_date") == F.lit(D1.isoformat()).cast("date")).toPandas()
    report.write_evaluation(lh.paths.reports(D1), "sample", today, {"run_date": D1.isoformat()})
    path = report.write_nightly(lh, D1)
    text = path.read_text()
    for section in ("Pipeline runs", "Metrics per model", "Metric trend", "Score distributions",
                    "Modality contributions"):
        assert f"## {section}" in text
    for png in ("evaluation_sample.png", "metric_trend.png", "score_distribution.png",
                "modality_contributions.png"):
        assert (path.parent / png).stat().st_size > 1000 and f"({png})" in text
    # each metric is plotted once: the nightly report links the evaluation's plot instead of drawing another
    assert sorted(p.name for p in path.parent.glob("*.png")) == [
        "evaluation_sample.png", "metric_trend.png", "modality_contributions.png", "score_distribution.png"]
    assert "rows_written=15" in text and "text_only" in text
    summ = contribution_table(lh, D1).set_index("modality")
    assert summ.loc["text", "present"] == 1.0 and 0 < summ.loc["audio", "present"] < 1
    assert abs(summ["share"].sum() - 1) < 1e-9
