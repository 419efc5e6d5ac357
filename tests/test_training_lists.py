"""training_lists stage: contract shapes, split by query, padding/truncation, missing modalities, idempotence."""
from __future__ import annotations

import numpy as np
import pandas as pd
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


# ---- an independent implementation of the documented split formula (no Spark) ------------------------------
_P1, _P2, _P3, _P4, _P5 = (11400714785074694791, 14029467366897019727, 1609587929392839161,
                           9650029242287828579, 2870177450012600261)
_M = (1 << 64) - 1


def _rotl(x, r):
    return ((x << r) | (x >> (64 - r))) & _M


def _round(acc, lane):
    return (_rotl((acc + lane * _P2) & _M, 31) * _P1) & _M


def xxh64(data: bytes, seed: int) -> int:
    """Reference XXH64 (unsigned), straight from the xxHash specification."""
    n, i, le = len(data), 0, lambda a, b: int.from_bytes(data[a:b], "little")
    if n >= 32:
        v = [(seed + _P1 + _P2) & _M, (seed + _P2) & _M, seed & _M, (seed - _P1) & _M]
        while i + 32 <= n:
            v = [_round(v[j], le(i + 8 * j, i + 8 * j + 8)) for j in range(4)]
            i += 32
        h = (_rotl(v[0], 1) + _rotl(v[1], 7) + _rotl(v[2], 12) + _rotl(v[3], 18)) & _M
        for x in v:
            h = ((h ^ _round(0, x)) * _P1 + _P4) & _M
    else:
        h = (seed + _P5) & _M
    h = (h + n) & _M
    while i + 8 <= n:
        h = (_rotl(h ^ _round(0, le(i, i + 8)), 27) * _P1 + _P4) & _M
        i += 8
    if i + 4 <= n:
        h = (_rotl(h ^ ((le(i, i + 4) * _P1) & _M), 23) * _P2 + _P3) & _M
        i += 4
    while i < n:
        h = (_rotl(h ^ ((data[i] * _P5) & _M), 11) * _P1) & _M
        i += 1
    h = ((h ^ (h >> 33)) * _P2) & _M
    h = ((h ^ (h >> 29)) * _P3) & _M
    return h ^ (h >> 32)


def spark_xxhash64(seed_int: int, s: str) -> int:
    """Spark's `xxhash64(<int literal>, <string>)`: hash seed 42, each column hashed with the previous hash as
    seed (an int as its 4 little-endian bytes, a string as its UTF-8 bytes); a signed 64-bit result."""
    h = xxh64((seed_int & 0xFFFFFFFF).to_bytes(4, "little"), 42)
    h = xxh64(s.encode(), h)
    return h - (1 << 64) if h >= 1 << 63 else h


def expected_split(query_id: str, seed: int, fractions: dict[str, float]) -> str:
    """The documented rule: u = pmod(xxhash64(seed, query_id), 1e6) / 1e6 in [0, 1) against the cumulative
    train / validation fractions; the rest is test."""
    u = (spark_xxhash64(seed, query_id) % 1_000_000) / 1_000_000.0
    cum = 0.0
    for name in ("train", "validation"):
        cum += fractions[name]
        if u < cum:
            return name
    return "test"


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
    # positions are a seeded shuffle, not "relevant first" (the three relevant items are not slots 0-2)
    assert [g > 0 for g in r["grades"][:3]] != [True] * 3


def test_positions_carry_no_grade_information(built):
    """Kept candidates are in a seeded hash order: neither relevant-first nor product-id order. (Random order
    puts a list's relevant items all in front with probability 1 / C(n, n_rel), e.g. 1/15 for 2 of 6.)"""
    lists = [r for r in built[2].values() if 0 < sum(g > 0 for g in r["grades"]) < r["list_len"]]
    assert len(lists) >= 15
    relevant_first = sum(sorted(r["grades"][:r["list_len"]], reverse=True) == r["grades"][:r["list_len"]]
                         for r in lists)
    id_order = sum(r["product_ids"] == sorted(r["product_ids"]) for r in lists)
    assert relevant_first <= len(lists) // 4, f"{relevant_first}/{len(lists)} lists are relevant-first"
    assert id_order <= len(lists) // 4, f"{id_order}/{len(lists)} lists are in product-id order"


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
    seed, split = lh.cfg.train.seed, lh.cfg.train.split
    qids = [f"q{i}" for i in range(4000)]
    # two differently built and partitioned DataFrames holding the same ids (reversed, 7 vs 3 partitions)
    ids = spark.range(4000).select(F.concat(F.lit("q"), F.col("id").cast("string")).alias("query_id"))
    other = spark.createDataFrame([(q,) for q in reversed(qids)], "query_id string").repartition(7, "query_id")
    col = training_lists.split_column(F.col("query_id"), seed, split)
    a = dict(ids.repartition(3).select("query_id", col.alias("s")).collect())
    b = dict(other.select("query_id", col.alias("s")).collect())
    want = {q: expected_split(q, seed, split) for q in qids}  # the documented formula, computed without Spark
    assert a == want and b == want
    frac = pd.Series(list(want.values())).value_counts(normalize=True)
    for name, f in split.items():
        assert abs(frac[name] - f) < 0.03
    other_seed = dict(ids.select("query_id", training_lists.split_column(
        F.col("query_id"), 99, split).alias("s")).collect())
    assert other_seed == {q: expected_split(q, 99, split) for q in qids}
    assert sum(other_seed[q] != want[q] for q in qids) / len(qids) > 0.2
    # in the table: one row (hence one split) per query, the split the formula gives; all splits are used
    rows = built[2]
    assert {q: r["split"] for q, r in rows.items()} == {q: expected_split(q, seed, split) for q in rows}
    assert len({r["split"] for r in rows.values()}) >= 2


def test_rerun_identical_and_load_split(built):
    lh, _, rows = built
    training_lists.run(lh, RUN_DATE)
    again = {r["query_id"]: r.asDict() for r in lh.read("training_lists").collect()}
    assert again == rows
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
