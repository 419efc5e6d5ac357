"""A bring-your-own text catalog end to end on real Spark + Delta: judgment scale said (1-3, 1 = irrelevant), lexical
features in the lists, the train stage's search and prior, the text tower fine-tuned and used for products and
queries, scoring with lexical features; and the Home Depot data (skips when ../shared is absent)."""
from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import make_config
from pyspark.sql import functions as F

from mmrank.data.byo import byo_grade
from mmrank.lakehouse import Lakehouse
from mmrank.lexical import LEX_FEATURES
from mmrank.ranker.artifact import load_artifact
from mmrank.stages import featurize, finetune_text, ingest, labels, lexical, score, train, training_lists

D = dt.date(2026, 11, 21)
HOMEDEPOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "homedepot"
CONCEPTS = [("blorf", "hammer"), ("quazz", "faucet"), ("zindle", "ladder"), ("mraxo", "drill"),
            ("tepko", "shovel"), ("vurnel", "lamp")]
ADJ = ["steel", "red", "cheap", "heavy duty", "compact", "outdoor", "classic", "pro"]
FORMS = ["{}", "{} tool", "best {}", "{} for home", "new {}", "{} sale", "{} deal"]


def _files(root: Path) -> tuple[Path, Path]:
    """Catalog + judgments on a 1-3 scale: a made-up query word names a real product word (3 = that word,
    2 = a hammer for a drill query etc. never; 1 = irrelevant)."""
    r = np.random.default_rng(0)
    cat = pd.DataFrame([{"product_id": f"p{c}{a}", "title": f"{adj} {w}", "brand": "Acme", "category": "tools"}
                        for c, (_, w) in enumerate(CONCEPTS) for a, adj in enumerate(ADJ)])
    rows = []
    for c, (word, _) in enumerate(CONCEPTS):
        for form in FORMS:
            q = form.format(word)
            rows += [{"query": q, "product_id": f"p{c}{a}", "grade": 3} for a in r.choice(8, 2, replace=False)]
            rows += [{"query": q, "product_id": f"p{o}{r.integers(8)}", "grade": 1}
                     for o in r.choice([o for o in range(6) if o != c], 5, replace=False)]
    jud = pd.DataFrame(rows).drop_duplicates(["query", "product_id"])
    root.mkdir(parents=True, exist_ok=True)
    cat.to_csv(root / "catalog.csv", index=False)
    jud.to_csv(root / "judgments.csv", index=False)
    return root / "catalog.csv", root / "judgments.csv"


@pytest.fixture(scope="module")
def byo(spark, tmp_path_factory):
    root = tmp_path_factory.mktemp("byo_learning")
    cfg = make_config(root, "train.list_size=8", "train.data_loader=parquet", "train.max_epochs=3",
                      "finetune.epochs=15", "finetune.patience=15", "finetune.lr=0.01", "finetune.batch_size=4")
    lh = Lakehouse(spark, cfg)
    cat, jud = _files(root / "files")
    counts = ingest.run(lh, D, source="byo", catalog=str(cat), judgments=str(jud), name="shop", grade_scale=(1, 3))
    labels.run(lh, D)
    featurize.run(lh, D)
    lexical.run(lh, D)
    training_lists.run(lh, D)
    return lh, counts, jud


def test_grade_scale_said_maps_lowest_to_irrelevant_and_is_recorded(byo, spark, caplog):
    lh, counts, jud = byo
    grades = sorted(r["grade"] for r in lh.read("judgments").select("grade").distinct().collect())
    assert grades == [0.0, 3.0]                                      # 1 (irrelevant) -> 0, 3 -> 3
    msg = lh.read("runs").where("stage = 'ingest'").first()["message"]
    assert "scale [1, 3] (given)" in msg and "grade' = (grade - 1) * 1.5" in msg
    # no scale said: the file's own range, with a warning that says what it assumed
    df = spark.createDataFrame(pd.DataFrame({"grade": ["1", "2.5", "3"]}))
    with caplog.at_level(logging.WARNING, logger="mmrank.ingest"):
        col, how = byo_grade(df, None)
    assert "no grade scale given" in caplog.text and "file range [1, 3]" in how
    assert [r[0] for r in df.select(col).collect()] == [0.0, 2.25, 3.0]
    col, _ = byo_grade(df, (0.0, 2.0))                                # said scale: 2.5 is out of range -> quarantined
    assert [r[0] for r in df.select(col).collect()] == [1.5, -1.0, -1.0]


def test_lists_carry_lexical_features_and_train_records_search_and_prior(byo):
    lh, _, _ = byo
    rows = lh.read("training_lists").select("p_lex", "list_len").collect()
    lex = np.stack([np.asarray(r["p_lex"]).reshape(8, len(LEX_FEATURES)) for r in rows])
    assert lex[..., LEX_FEATURES.index("query_terms")].max() >= 1 and lex[..., LEX_FEATURES.index("cover_all")].max() > 0
    train.run(lh, D)
    _, meta = load_artifact(lh.paths.artifacts)
    t = meta["tuning"]
    assert len(t["trials"]) == lh.cfg.train.tune.trials and t["chosen"] in [
        {k: tr[k] for k in ("lr", "weight_decay", "patience")} for tr in t["trials"]]
    assert meta["train"]["lr"] == t["chosen"]["lr"] and meta["alignment"] is None      # text only: nothing to align
    assert meta["val_metrics"]["ndcg@10"] >= meta["initial_val_metrics"]["ndcg@10"]     # never below the prior
    c = score.run(lh, D)                                                # scoring joins the pairs' lexical features
    assert c["rows_written"] > 0


def test_finetuned_text_tower_is_used_for_products_and_queries(byo):
    lh, _, _ = byo
    finetune_text.run(lh, D, mode="adapter")
    info = json.loads(lh.read("runs").where("stage = 'finetune_text'").first()["message"])
    assert info["path"] and info["best_val_ndcg10"] > info["base_val_ndcg10"]
    text = lh.cfg.features.text.model_copy(update={"path": info["path"]})
    ft = Lakehouse(lh.spark, lh.cfg.model_copy(update={"features": lh.cfg.features.model_copy(update={"text": text})}))
    c = featurize.run(ft, D)
    n_products, n_queries = lh.read("products").count(), lh.read("queries").count()
    assert c["encoded_products_text"] == n_products and c["encoded_queries_text"] == n_queries
    versions = {r[0] for t in ("product_features", "query_features")
                for r in ft.read(t).where("modality = 'text'").select("encoder_version").distinct().collect()}
    assert versions == {info["version"]}


@pytest.mark.skipif(not (HOMEDEPOT / "judgments.csv").exists(), reason="no ../shared/data/homedepot (data set absent)")
def test_homedepot_grades_map_one_to_irrelevant(spark, tmp_path):
    from mmrank.data.homedepot import HOMEDEPOT_SCALE, byo_files

    cat, jud = byo_files(HOMEDEPOT, tmp_path / "files", max_queries=30, seed=1)
    lh = Lakehouse(spark, make_config(tmp_path / "lh"))
    ingest.run(lh, D, source="byo", catalog=str(cat), judgments=str(jud), name="hd", grade_scale=HOMEDEPOT_SCALE)
    raw = pd.read_csv(jud)
    got = lh.read("judgments").agg(F.count("*"), F.min("grade"), F.max("grade"), F.sum((F.col("grade") == 0)
                                                                                     .cast("int"))).first()
    assert got[0] == len(raw) and got[1] == 0.0 and got[2] <= 3.0
    assert got[3] == int((raw["grade"] == 1).sum())                  # every all-raters-irrelevant pair is 0
