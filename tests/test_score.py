"""Batch scoring (issue #7): candidates, mapInPandas scoring, top-N ranking, idempotent replaceWhere, int8."""
from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest
from pyspark.sql import Row
from pyspark.sql import functions as F

from mmrank.scoring import candidates, features, scorer
from mmrank.scoring.snapshot import snapshot_tables, task_slots
from mmrank.stages import score
from mmrank.lakehouse import Lakehouse
from mmrank.partitions import one_partition_per_value
from tests.conftest import make_config

D1, D2, D3 = dt.date(2026, 11, 20), dt.date(2026, 11, 21), dt.date(2026, 11, 22)
DIMS = {"text": 16, "image": 12, "audio": 8}


def _emb(rng, n):
    return [float(x) for x in rng.normal(size=n)]


def build_inputs(lh: Lakehouse, n_products: int = 40, n_queries: int = 8, seed: int = 0) -> str:
    """Small feature tables + a one-day query log + a freshly initialised FusionRanker artifact.

    p000 has no features at all, q_nofeat has none either; every 3rd product lacks audio, every 5th lacks
    an image; every 4th query is a voice query (audio only). Returns the artifact version.
    """
    from mmrank.config import TrainConf
    from mmrank.ranker.artifact import save_artifact
    from mmrank.modalities import ModalityDims
    from mmrank.ranker.fit import build_model

    rng = np.random.default_rng(seed)
    spark = lh.spark
    prows = []
    for i in range(1, n_products):
        pid = f"p{i:03d}"
        for m in ("text", "image", "audio"):
            if (m == "audio" and i % 3 == 0) or (m == "image" and i % 5 == 0):
                continue
            prows.append(Row(product_id=pid, modality=m, embedding=_emb(rng, DIMS[m]), dim=DIMS[m], encoder="t",
                             encoder_version="t1", content_hash=pid, run_date=D1))
    qrows, qids = [], [f"q{j:02d}" for j in range(n_queries)]
    for j, qid in enumerate(qids):
        m = "audio" if j % 4 == 3 else "text"
        qrows.append(Row(query_id=qid, modality=m, embedding=_emb(rng, DIMS[m]), dim=DIMS[m], encoder="t",
                         encoder_version="t1", content_hash=qid, run_date=D1))
    lh.overwrite("product_features", spark.createDataFrame(prows, lh.read("product_features").schema))
    lh.overwrite("query_features", spark.createDataFrame(qrows, lh.read("query_features").schema))
    log, ev = [], 0
    for qid in qids + ["q_nofeat"]:
        shown = ["p000"] + [f"p{k:03d}" for k in rng.choice(np.arange(1, n_products), 9, replace=False)]
        for pos, pid in enumerate(shown):
            ev += 1
            log.append(Row(event_id=f"e{ev}", session_id="s", query_id=qid, product_id=pid, position=pos + 1,
                           clicked=False, added_to_cart=False, purchased=False,
                           event_ts=dt.datetime(2026, 11, 20, 12), run_date=D1))
    lh.overwrite("query_log", spark.createDataFrame(log, lh.read("query_log").schema))
    model = build_model(ModalityDims(**DIMS), TrainConf(proj_dim=8, hidden_dim=16))
    return save_artifact(model, {"run_date": D1.isoformat()},
                         lh.paths.artifacts)


@pytest.fixture
def slh(spark, tmp_path) -> Lakehouse:
    cfg = make_config(tmp_path, "score.top_n=5", "score.similarity_top_k=6", "score.candidates=both",
                      "score.batch_size=16")
    return Lakehouse(spark, cfg)


def _day(lh, d) -> pd.DataFrame:
    return (lh.read("ranking_scores").where(F.col("run_date") == F.lit(d.isoformat()).cast("date")).toPandas()
            .sort_values(["query_id", "rank"]).reset_index(drop=True))


def test_score_writes_ranked_top_n_idempotently(slh):
    version = build_inputs(slh)
    counts = score.run(slh, D1)
    day = _day(slh, D1)
    assert set(day["model_version"]) == {version}
    assert "q_nofeat" not in set(day["query_id"]) and "p000" not in set(day["product_id"])
    assert counts["pairs_skipped_no_product_features"] >= 8  # p000 shown to every query
    assert counts["queries_skipped_no_features"] == 1 and counts["products_skipped_no_features"] == 1
    assert counts["rows_written"] == len(day) and counts["queries_ranked"] == 8
    for qid, g in day.groupby("query_id"):
        assert list(g["rank"]) == list(range(1, len(g) + 1)) and len(g) == 5
        assert (np.diff(g["score"].to_numpy()) <= 0).all()
    assert day[["contrib_text", "contrib_image", "contrib_audio"]].notna().all().all()
    assert (day["contrib_text"] != 0).any()
    # absent modality -> contribution exactly 0 (every 3rd product has no audio)
    no_audio = day["product_id"].str[1:].astype(int) % 3 == 0
    assert (day.loc[no_audio, "contrib_audio"] == 0).all()

    score.run(slh, D2)
    before_d2 = _day(slh, D2)
    score.run(slh, D1)  # re-run: exactly that date's rows replaced, identical, nothing duplicated
    pd.testing.assert_frame_equal(_day(slh, D1), day)
    pd.testing.assert_frame_equal(_day(slh, D2), before_d2)
    assert slh.read("ranking_scores").count() == 2 * len(day)
    from mmrank.runs import stage_status

    assert stage_status(slh, D1, "score") == "succeeded"


def test_spark_scores_match_plain_score_pairs_and_int8_is_close(spark, tmp_path):
    """Keys-only scoring over many feature buckets (tiny `score.bucket_mb`) = the model on joined features."""
    from scipy.stats import spearmanr

    slh = Lakehouse(spark, make_config(tmp_path, "score.top_n=5", "score.batch_size=16", "score.bucket_mb=0.002"))
    version = build_inputs(slh, seed=1)
    score.run(slh, D1, candidates=["impressions"])
    day = _day(slh, D1)
    adir = str(slh.paths.artifacts)
    model, _ = scorer.load_scorer(adir, version)
    pairs = (candidates.impression_pairs(slh, D1)
             .join(features.query_feature_frame(slh.read("query_features")), "query_id")
             .join(features.product_feature_frame(slh.read("product_features")), "product_id").toPandas())
    direct = scorer.score_frame(model, pairs, model.dims.as_dict())
    m = day.merge(direct, on=["query_id", "product_id"], suffixes=("", "_d"))
    assert len(m) == len(day)
    np.testing.assert_allclose(m["score"], m["score_d"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m["contrib_image"], m["contrib_image_d"], rtol=1e-4, atol=1e-5)

    q_counts = score.run(slh, D3, quantize=True, candidates=["impressions"])
    qday = _day(slh, D3)
    assert set(qday["model_version"]) == {version + scorer.QUANT_SUFFIX}
    assert q_counts["pairs_scored"] > 0
    qmodel, _ = scorer.load_scorer(adir, version, quantize=True)
    qd = scorer.score_frame(qmodel, pairs, model.dims.as_dict())
    rho = spearmanr(direct["score"], qd["score"]).statistic
    assert rho > 0.95, rho


@pytest.mark.parametrize("bucket_mb", [256.0, 0.0002])
def test_similarity_candidates_equal_brute_force(spark, tmp_path, bucket_mb):
    """Blocked top-k (one bucket per side, or several query buckets x product groups) = brute force."""
    slh = Lakehouse(spark, make_config(tmp_path, f"score.bucket_mb={bucket_mb}"))
    build_inputs(slh, n_products=60, seed=2)
    snap = snapshot_tables(slh, str(slh.paths.work("similarity")), None, bucket_mb, task_slots(spark))
    assert snap.files is not None  # the tables' own files, read in place
    assert bucket_mb > 1 or snap.query_buckets > 1
    got = candidates.top_k_by_similarity(slh, k=4, max_cells=50, snapshot=snap).toPandas()
    prods = slh.read("product_features").toPandas()
    quers = slh.read("query_features").toPandas()
    for _, q in quers.iterrows():
        cand = prods[prods["modality"] == q["modality"]]
        mat = np.stack(cand["embedding"].to_numpy())
        qv = np.asarray(q["embedding"])
        sims = mat @ qv / (np.linalg.norm(mat, axis=1) * np.linalg.norm(qv))
        want = set(cand["product_id"].to_numpy()[np.argsort(-sims)[:4]])
        assert set(got[got["query_id"] == q["query_id"]]["product_id"]) == want
    assert len(got) == 4 * len(quers)


@pytest.mark.parametrize("as_text", [False, True], ids=["cell-numbers", "split-names"])
def test_each_cell_gets_a_task_of_its_own(spark, as_text):
    """Scoring tasks are cells (query bucket x product bucket), featurize's media tasks are file splits:
    partition c holds exactly value c's rows, even with few distinct values and skewed sizes (a range
    repartition can merge values, a hash one collides)."""
    cell = F.col("id") % 97 % 7 * 3  # cells 0, 3, .., 18
    df = spark.range(5000).select((F.format_string("file:/t/part-%d.parquet|0", cell) if as_text else cell)
                                  .alias("_cell"), F.col("id"))
    out = one_partition_per_value(df, "_cell")
    got = out.select(F.spark_partition_id().alias("pid"), "_cell").groupBy("pid", "_cell").count().toPandas()
    assert out.rdd.getNumPartitions() == 7 and sorted(got["pid"]) == list(range(7))  # no empty task, no sharing
    want = list(range(0, 21, 3))
    assert sorted(got["_cell"]) == (sorted(f"file:/t/part-{c}.parquet|0" for c in want) if as_text else want)
    assert got["count"].sum() == 5000


def test_score_codes_equal_forward(one_torch_thread):
    """`encode_queries` / `encode_products` + `score_codes` = `score_and_contributions` on lists of one pair,
    for both fusions, modality subsets, without match features, the bm25 / similarity / no prior, PCA inputs,
    with and without the cross-modal alignment and lexical features; absent modalities included."""
    import torch

    from mmrank.config import TrainConf
    from mmrank.modalities import ModalityDims
    from mmrank.ranker.batch import batch_from_arrays
    from mmrank.lexical import N_LEX
    from mmrank.ranker.fit import build_model

    rng = np.random.default_rng(3)
    nq, npr = 6, 9
    q = {m: rng.normal(size=(nq, DIMS[m])).astype(np.float32) for m in ("text", "audio")}
    p = {m: rng.normal(size=(npr, DIMS[m])).astype(np.float32) for m in ("text", "image", "audio")}
    q_mask = np.array([[1, 0], [0, 1], [1, 1], [1, 0], [0, 1], [0, 0]], np.float32)
    p_mask = (rng.random((npr, 3)) > 0.3).astype(np.float32)
    p_mask[0] = [1, 1, 1]
    qi, pi = np.repeat(np.arange(nq), npr), np.tile(np.arange(npr), nq)

    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a))

    lex = rng.gamma(1.0, 2.0, size=(nq * npr, N_LEX)).astype(np.float32)  # per-pair lexical features
    torch.manual_seed(0)
    for kw in ({}, {"fusion": "concat"}, {"modalities": ["text", "audio"]}, {"match_features": False},
               {"prior": "bm25"}, {"modalities": ["image"]}, {"pca_dim": 4}, {"align": {"enabled": False}},
               {"prior": "none", "lexical_features": False}):
        model = build_model(ModalityDims(**DIMS), TrainConf(proj_dim=8, hidden_dim=16, **kw)).eval()
        with torch.no_grad():  # a trained-looking model: residual head, alignment and PCA all non-trivial
            for prm in model.parameters():
                prm.add_(0.3 * torch.randn_like(prm))
            for name, buf in model.named_buffers():
                if name.startswith(("align_", "pca")):
                    buf.normal_()
        qc = model.encode_queries(t(q["text"]), t(q["audio"]), t(q_mask))
        pc = model.encode_products(t(p["text"]), t(p["image"]), t(p["audio"]), t(p_mask))
        s, c = model.score_codes(qc, pc, t(qi), t(pi), t(lex))
        batch = batch_from_arrays(q_text=q["text"][qi], q_audio=q["audio"][qi], q_mask=q_mask[qi],
                                  p_text=p["text"][pi, None], p_image=p["image"][pi, None],
                                  p_audio=p["audio"][pi, None], p_mask=p_mask[pi, None], p_lex=lex[:, None])
        want_s, want_c = model.score_and_contributions(batch)
        np.testing.assert_allclose(s.numpy(), want_s[:, 0].numpy(), rtol=1e-5, atol=1e-5, err_msg=str(kw))
        np.testing.assert_allclose(c.numpy(), want_c[:, 0].numpy(), rtol=1e-4, atol=1e-5, err_msg=str(kw))


def test_score_pairs_masks_missing_modalities():
    import torch

    from mmrank.config import TrainConf
    from mmrank.modalities import ModalityDims
    from mmrank.ranker.fit import build_model

    torch.manual_seed(0)
    model = build_model(ModalityDims(**DIMS), TrainConf(proj_dim=8, hidden_dim=16)).eval()
    rng = np.random.default_rng(0)
    q = {"text": rng.normal(size=(5, 16)).astype(np.float32)}
    p = {"text": rng.normal(size=(5, 16)).astype(np.float32), "image": rng.normal(size=(5, 12)).astype(np.float32)}
    s, c = scorer.score_pairs(model, q, p)
    assert s.shape == (5,) and c.shape == (5, 3) and (c[:, 2] == 0).all()
    # garbage in an absent modality's slot changes nothing when its mask is 0
    p2 = {**p, "audio": rng.normal(size=(5, 8)).astype(np.float32) * 100,
          "mask": np.array([[1, 1, 0]] * 5, np.float32)}
    s2, _ = scorer.score_pairs(model, q, p2)
    np.testing.assert_allclose(s, s2, rtol=1e-6)
    with pytest.raises(ValueError, match="expects"):
        scorer.score_pairs(model, {"text": np.zeros((5, 7), np.float32)}, p)
