"""training_lists stage: contract shapes, split by query, padding/truncation, missing modalities, idempotence."""
from __future__ import annotations

import numpy as np
import pytest
from pyspark.sql import functions as F

from _toy_lists import DIMS, RUN_DATE, write_toy
from conftest import make_config
from mmrank.stages import training_lists
from mmrank.lakehouse import Lakehouse

L = 8


@pytest.fixture(scope="module")
def built(spark, tmp_path_factory):
    lh = Lakehouse(spark, make_config(tmp_path_factory.mktemp("lists"), f"train.list_size={L}"))
    write_toy(lh, n_queries=20, n_cands=6, no_image={"q000_p00"},
              extra={"q_long": (30, 3), "q_short": (3, 1)})
    counts = training_lists.run(lh, RUN_DATE)
    rows = {r["query_id"]: r.asDict() for r in lh.read("training_lists").collect()}
    return lh, counts, rows


def test_contract_shapes(built):
    _, counts, rows = built
    assert counts["lists"] == len(rows) == 22
    for r in rows.values():
        assert len(r["grades"]) == L and len(r["q_text"]) == DIMS["text"] and len(r["q_audio"]) == DIMS["audio"]
        assert len(r["q_mask"]) == 2 and len(r["p_mask"]) == L * 3
        for m, d in DIMS.items():
            assert len(r[f"p_{m}"]) == L * d
        assert r["list_len"] == len(r["product_ids"]) <= L


def test_padding(built):
    r = built[2]["q_short"]
    assert r["list_len"] == 3
    assert r["grades"][3:] == [-1.0] * (L - 3) and min(r["grades"][:3]) >= 0
    assert not any(r["p_mask"][9:]) and not any(r["p_text"][3 * DIMS["text"]:])
    assert all(r["p_mask"][:9])


def test_truncation_keeps_relevant(built):
    r = built[2]["q_long"]
    assert r["list_len"] == L
    assert {f"q_long_p{j:02d}" for j in range(3)} <= set(r["product_ids"])
    assert sum(g > 0 for g in r["grades"]) == 3
    # positions are a seeded shuffle, not "relevant first"
    assert [g > 0 for g in r["grades"][:3]] != [True] * 3 or r["product_ids"][0] != "q_long_p00"


def test_missing_modalities_are_zero_with_mask_0(built):
    r = built[2]["q000"]
    i = r["product_ids"].index("q000_p00")
    assert r["p_mask"][3 * i:3 * i + 3] == [1.0, 0.0, 1.0]
    assert not any(r["p_image"][i * DIMS["image"]:(i + 1) * DIMS["image"]])
    voice = built[2]["q003"]  # every 4th query is voice: audio only
    assert voice["q_mask"] == [0.0, 1.0] and not any(voice["q_text"]) and any(voice["q_audio"])
    assert built[2]["q000"]["q_mask"] == [1.0, 0.0]


def test_grades_align_with_products(built):
    lh = built[0]
    labels = {(r.query_id, r.product_id): r.label for r in lh.read("labels").collect()}
    for qid, r in built[2].items():
        assert [labels[(qid, p)] for p in r["product_ids"]] == pytest.approx(r["grades"][:r["list_len"]])


def test_quarantine_query_without_features(built):
    lh = built[0]
    q = lh.read("quarantine").where(F.col("stage") == "training_lists").collect()
    assert any(r.record_id == "q_nofeat" and "no features" in r.reason for r in q)
    assert "q_nofeat" not in built[2]


def test_split_by_query_deterministic_and_fractions(built, spark):
    lh = built[0]
    split = lh.cfg.train.split
    ids = spark.range(4000).select(F.concat(F.lit("q"), F.col("id").cast("string")).alias("query_id"))
    col = training_lists.split_column(F.col("query_id"), lh.cfg.train.seed, split)
    a = ids.select("query_id", col.alias("s")).toPandas()
    b = ids.select("query_id", col.alias("s")).toPandas()
    assert a.equals(b)
    frac = a["s"].value_counts(normalize=True)
    for name, f in split.items():
        assert abs(frac[name] - f) < 0.03
    other_seed = ids.select(training_lists.split_column(F.col("query_id"), 99, split).alias("s")).toPandas()
    assert (other_seed["s"] != a["s"]).mean() > 0.2
    # in the table: one row (hence one split) per query; all splits are used
    rows = built[2]
    assert len({r["split"] for r in rows.values()}) >= 2


def test_rerun_identical_and_load_split(built):
    lh, _, rows = built
    training_lists.run(lh, RUN_DATE)
    again = {r["query_id"]: r.asDict() for r in lh.read("training_lists").collect()}
    assert again == rows
    pytest.importorskip("mmrank.ranker.batch")
    for split in ("train", "validation", "test"):
        n = sum(r["split"] == split for r in rows.values())
        batch = training_lists.load_split(lh, split)
        if n == 0:
            continue
        assert tuple(batch["grades"].shape) == (n, L)
        assert tuple(batch["p_image"].shape) == (n, L, DIMS["image"])
        assert np.all((batch["p_mask"].sum(-1) == 0).numpy() | (batch["grades"] >= 0).numpy())


def test_read_split_is_bounded_and_deterministic(built):
    """A split larger than the bound is sampled (seeded hash of query_id), the same lists every time."""
    lh, _, rows = built
    n = sum(r["split"] == "train" for r in rows.values())
    assert n > 3
    a = training_lists.read_split(lh, "train", max_lists=3)
    b = training_lists.read_split(lh, "train", max_lists=3)
    assert len(a) == 3 and a["query_id"].tolist() == b["query_id"].tolist() == sorted(a["query_id"])
    assert len(training_lists.read_split(lh, "train", max_lists=n + 5)) == n
