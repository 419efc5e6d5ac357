"""Model lifecycle (issue #16): MLflow runs and registry on the embedded SQLite store, the promotion gate,
manual promote / rollback, and a nightly whose training labels are shuffled being refused by the gate."""
from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path

import numpy as np
import pytest
from pyspark.sql import functions as F

from mmrank import nightly, tracking
from mmrank.lakehouse import Lakehouse
from mmrank.modalities import ModalityDims
from mmrank.stages import promote, train
from mmrank.stages.promote import gate_decision
from mmrank.testing.lists import synthetic_lists_df
from tests.conftest import make_config

D1, D2, D3 = dt.date(2026, 11, 20), dt.date(2026, 11, 21), dt.date(2026, 11, 22)
DIMS = ModalityDims(text=8, image=6, audio=4)


def test_gate_decision_rule():
    assert gate_decision(0.70, 0.71, 0.02, "ndcg@10")[0]                      # within tolerance
    assert gate_decision(0.80, 0.71, 0.0, "ndcg@10")[0]
    ok, why = gate_decision(0.60, 0.71, 0.02, "ndcg@10")
    assert not ok and why == "challenger ndcg@10 0.6000 < champion 0.7100 - tolerance 0.0200"
    assert gate_decision(0.5, None, 0.0, "ndcg@10")[0]                        # champion cannot score the lists
    assert not gate_decision(float("nan"), 0.5, 0.0, "ndcg@10")[0]            # nothing to judge the new model on
    assert not gate_decision(None, 0.5, 0.0, "ndcg@10")[0]
    assert not gate_decision(0.5, float("nan"), 0.0, "ndcg@10")[0]


def _lists(lh: Lakehouse, shuffle_train: bool = False, seed: int = 0) -> None:
    """Synthetic training_lists with a learnable signal; `shuffle_train` permutes the grades inside every
    train-split list (a label bug), validation and test lists stay intact."""
    df = synthetic_lists_df(lh.spark, 160, lh.cfg.train.list_size, DIMS, seed=seed).toPandas()
    if shuffle_train:
        rng = np.random.default_rng(1)
        for i in df.index[df["split"] == "train"]:
            g = np.asarray(df.at[i, "grades"], float)
            n = int(df.at[i, "list_len"])
            g[:n] = rng.permutation(g[:n])
            df.at[i, "grades"] = g.tolist()
    lh.overwrite("training_lists", lh.spark.createDataFrame(df, lh.read("training_lists").schema))


def _runs_row(lh: Lakehouse, day: dt.date, stage: str):
    return lh.read("runs").where((F.col("run_date") == F.lit(day.isoformat()).cast("date"))
                                 & (F.col("stage") == stage)).first()


@pytest.fixture
def tlh(spark, tmp_path) -> Lakehouse:
    cfg = make_config(tmp_path, "train.max_epochs=8", "train.patience=8", "train.list_size=12",
                      "train.data_loader=parquet", "train.proj_dim=16", "train.hidden_dim=32",
                      "train.match_features=false", "tracking.gate_tolerance=0.02")
    return Lakehouse(spark, cfg)


def test_runs_registry_gate_manual_promote_and_rollback(tlh):
    lh = tlh
    _lists(lh)
    train.run(lh, D1)
    tr = tracking.tracker(lh)
    assert (lh.paths.tracking / "mlflow.db").exists()
    v1 = _runs_row(lh, D1, "train")["model_version"]
    # the MLflow run: params (config + data versions), per-epoch validation metrics, the safetensors folder
    run = tr.find_runs(mmrank_stage="train", mmrank_artifact_version=v1)[0]
    params = run.data.params
    assert params["train.fusion"] == "gated"
    assert params["data.training_lists_version"] == str(lh.version("training_lists"))
    history = tr.client.get_metric_history(run.info.run_id, "val_ndcg_at_10")
    assert [m.step for m in history] == list(range(len(history))) and len(history) >= 2
    files = {f.path for f in tr.client.list_artifacts(run.info.run_id, "model")}
    assert files == {"model/weights.safetensors", "model/model.json", "model/MLmodel"}
    mlmodel = Path(run.info.artifact_uri.removeprefix("file://")) / "model" / "MLmodel"
    assert "mmrank" in mlmodel.read_text() and "python_function" not in mlmodel.read_text()
    config = json.loads((Path(run.info.artifact_uri.removeprefix("file://")) / "config.json").read_text())
    assert config["tracking"]["gate_tolerance"] == 0.02
    assert tr.alias(tracking.CHALLENGER).artifact_version == v1 and tr.alias(tracking.CHAMPION) is None

    counts = promote.run(lh, D1)                                       # first model: promoted without comparison
    assert counts["promoted"] == 1 and tracking.champion_version(lh) == v1
    assert tr.alias(tracking.CHALLENGER) is None

    train.run(lh, D1)                                                  # re-run: same artifact, same run, same version
    assert len(tr.find_runs(mmrank_stage="train")) == 1 and len(tr.versions_frame()) == 1

    _lists(lh, shuffle_train=True)                                     # a label bug in the training set
    train.run(lh, D2)
    v2 = _runs_row(lh, D2, "train")["model_version"]
    assert v2 != v1 and tr.alias(tracking.CHALLENGER).artifact_version == v2
    counts = promote.run(lh, D2)
    row = _runs_row(lh, D2, "promote")
    assert counts["refused"] == 1 and counts["validation_lists"] > 10
    assert row["message"].startswith(f"refused: {v2}") and "< champion" in row["message"]
    assert row["model_version"] == v1 and tracking.champion_version(lh) == v1
    new, old = (float(x.split(" ")[0]) for x in row["message"].split("ndcg@10 ")[1].split(" < champion "))
    assert old - new > 0.02
    # the gate measures what training measured: the challenger's value is its own early-stopping metric
    meta = json.loads((lh.paths.artifacts / "models" / v2 / "model.json").read_text())
    assert math.isclose(new, meta["val_metrics"]["ndcg@10"], abs_tol=1e-4)

    promote.run(lh, D2, version=v2)                                    # operator overrides the gate
    assert tracking.champion_version(lh) == v2
    assert "manual promotion" in _runs_row(lh, D2, "promote")["message"]
    promote.run(lh, D3, rollback=True)                                 # ... and rolls it back
    assert tracking.champion_version(lh) == v1
    with pytest.raises(ValueError, match="no recorded predecessor"):
        promote.run(lh, D3, rollback=True)
    assert _runs_row(lh, D3, "promote")["status"] == "failed"
    frame = tr.versions_frame().set_index("artifact_version")
    assert frame.loc[v1, "aliases"] == "champion" and frame.loc[v2, "gate"].startswith("promoted manually")


def test_tracking_disabled_keeps_the_latest_artifact_behaviour(spark, tmp_path):
    lh = Lakehouse(spark, make_config(tmp_path, "tracking.enabled=false", "train.max_epochs=1",
                                      "train.list_size=12", "train.data_loader=parquet"))
    _lists(lh)
    train.run(lh, D1)
    assert promote.run(lh, D1) == {"promoted": 0}
    assert _runs_row(lh, D1, "promote")["message"].startswith("tracking disabled")
    assert tracking.champion_version(lh) is None and not lh.paths.tracking.exists()


def _shuffle_train_grades(lh: Lakehouse) -> None:
    """Permute the grades inside every train-split list of `training_lists` (validation and test untouched)."""
    df = lh.read("training_lists").toPandas()
    rng = np.random.default_rng(5)
    for i in df.index[df["split"] == "train"]:
        g, n = np.asarray(df.at[i, "grades"], float), int(df.at[i, "list_len"])
        g[:n] = rng.permutation(g[:n])
        df.at[i, "grades"] = g.tolist()
    lh.overwrite("training_lists", lh.spark.createDataFrame(df, lh.read("training_lists").schema))


@pytest.mark.slow
def test_nightly_registers_a_champion_and_the_gate_refuses_shuffled_labels(spark, tmp_path):
    from mmrank.stages import training_lists

    cfg = make_config(tmp_path, "generator.n_products=60", "generator.n_queries=40", "train.max_epochs=6",
                      "train.patience=6", "train.data_loader=parquet", "score.top_n=5", "score.similarity_top_k=5",
                      "evaluate.baselines=false", "tracking.gate_tolerance=0.0",
                      "train.prior=none")  # the promotion gate under test, not the prior: with the prior and 6
    # validation lists both nights keep the untrained (prior-only) model, the same version, and there is no challenger
    lh = Lakehouse(spark, cfg)
    nightly.run_nightly(lh, D1, echo=print)
    tr = tracking.tracker(lh)
    v1 = _runs_row(lh, D1, "train")["model_version"]
    assert tr.find_runs(mmrank_stage="train", mmrank_artifact_version=v1)          # an MLflow run ...
    assert tracking.champion_version(lh) == v1                                     # ... and a registered champion
    assert tr.find_runs(mmrank_stage="evaluate", mmrank_run_date=D1.isoformat())   # the evaluation is a run too

    def broken_lists(lh, d, o):  # a label bug upstream: the training set's grades are shuffled
        counts = training_lists.run(lh, d)
        _shuffle_train_grades(lh)
        return counts

    steps = [nightly.Step(s.name, broken_lists) if s.name == "training_lists" else s for s in nightly.PIPELINE]
    res = nightly.run_nightly(lh, D2, steps=steps, echo=print)
    v2 = _runs_row(lh, D2, "train")["model_version"]
    row = _runs_row(lh, D2, "promote")
    assert v2 != v1 and row["message"].startswith(f"refused: {v2}"), row["message"]
    assert tracking.champion_version(lh) == v1 and tr.alias(tracking.CHALLENGER).artifact_version == v2
    served = lh.read("ranking_scores").where(F.col("run_date") == F.lit(D2.isoformat()).cast("date"))
    assert {r["model_version"] for r in served.select("model_version").distinct().collect()} == {v1}
    report = Path(res.report_path).read_text()
    assert "## Model promotion" in report and f"refused: {v2}" in report and "< champion" in report
