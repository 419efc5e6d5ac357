"""Feature snapshots (issue #14): the raw-file writer (pyarrow in tasks) writes what the Spark writer writes, in
the buckets Spark's `bucket_of` names, and falls back to Spark when the files cannot be read raw."""
from __future__ import annotations

import datetime as dt

import numpy as np
from pyspark.sql import Row

from mmrank.lakehouse import Lakehouse
from mmrank.modalities import PRODUCT_MODALITIES, QUERY_MODALITIES
from mmrank.scoring.features import usable_rows
from mmrank.scoring.snapshot import (SIDES, bucket_ids, bucket_of, raw_files, read_bucket, snapshot_tables,
                                     write_snapshot)
from tests.conftest import make_config

DIMS = {"text": 16, "image": 12, "audio": 8}
D1 = dt.date(2026, 11, 20)


def _tables(lh: Lakehouse) -> None:
    """Products p0..p29 and queries q0..q9 with every modality, plus rows the model cannot use: a NaN (p3
    text), a wrong width (p4 image), a null value (p5 audio), an unknown modality (p6 video)."""
    rng = np.random.default_rng(0)

    def row(key, i, m, emb):
        return Row(**{key: i}, modality=m, embedding=emb, dim=len(emb), encoder="t", encoder_version="t1",
                   content_hash=i, run_date=D1)

    prows = [row("product_id", f"p{i}é" if i == 7 else f"p{i}", m, [float(x) for x in rng.normal(size=d)])
             for i in range(30) for m, d in DIMS.items()]
    prows[3 * 3] = row("product_id", "p3", "text", [float("nan")] + [1.0] * 15)
    prows[4 * 3 + 1] = row("product_id", "p4", "image", [1.0] * 11)
    prows[5 * 3 + 2] = row("product_id", "p5", "audio", [1.0, None] + [1.0] * 6)
    prows.append(row("product_id", "p6", "video", [1.0] * 4))
    qrows = [row("query_id", f"q{j}", m, [float(x) for x in rng.normal(size=DIMS[m])])
             for j in range(10) for m in QUERY_MODALITIES if m == "text" or j % 3 == 0]
    lh.overwrite("product_features", lh.spark.createDataFrame(prows, lh.read("product_features").schema)
                 .repartition(3))
    lh.overwrite("query_features", lh.spark.createDataFrame(qrows, lh.read("query_features").schema))


def _contents(snap, side: str) -> dict[str, dict[str, list[float]]]:
    """{id: {modality: embedding}} over every bucket; asserts each id sits in the bucket `bucket_ids` names."""
    out: dict[str, dict[str, list[float]]] = {}
    _, mods = SIDES[side]
    for b in range(snap.buckets(side)):
        ids, feats = read_bucket(snap, side, b, DIMS)
        assert list(ids) == sorted(ids)
        assert (bucket_ids(list(ids), snap.buckets(side)) == b).all()
        for r, i in enumerate(ids):
            out[i] = {m: feats[m][r].tolist() for k, m in enumerate(mods) if feats["mask"][r, k] > 0}
    return out


def test_python_buckets_equal_spark_buckets(spark):
    ids = [f"p{i}" for i in range(500)] + ["", "pé", "日本語", "a b"]
    got = spark.createDataFrame([(i,) for i in ids], "id string").select("id", bucket_of("id", 7).alias("b"))
    spark_b = dict(got.toPandas().itertuples(index=False))
    np.testing.assert_array_equal(bucket_ids(ids, 7), [spark_b[i] for i in ids])
    assert len(set(spark_b.values())) == 7


def test_raw_snapshot_equals_spark_snapshot_and_falls_back(spark, tmp_path):
    lh = Lakehouse(spark, make_config(tmp_path / "a lakehouse"))  # a space: file URIs come percent-encoded
    _tables(lh)
    assert raw_files(lh, "product_features") is not None
    raw = snapshot_tables(lh, str(tmp_path / "raw"), DIMS, bucket_mb=0.003)
    assert raw.product_buckets > 1 and raw.query_buckets > 1
    ref = write_snapshot(str(tmp_path / "spark"),
                         usable_rows(lh.read("query_features"), "query_id", QUERY_MODALITIES, DIMS),
                         usable_rows(lh.read("product_features"), "product_id", PRODUCT_MODALITIES, DIMS),
                         bucket_mb=0.003)
    products = _contents(raw, "products")
    assert products == _contents(ref, "products")
    assert _contents(raw, "queries") == _contents(ref, "queries")
    assert len(products) == 30 and "p7é" in products
    assert set(products["p3"]) == {"image", "audio"} and set(products["p4"]) == {"text", "audio"}
    assert set(products["p5"]) == {"text", "image"} and set(products["p6"]) == set(DIMS)

    # deletion vectors: the files may hold deleted rows, so the snapshot is written by Spark instead
    spark.sql(f"ALTER TABLE {lh.ident('product_features')} SET TBLPROPERTIES ('delta.enableDeletionVectors' = true)")
    assert raw_files(lh, "product_features") is None
    spark.sql(f"DELETE FROM {lh.ident('product_features')} WHERE product_id = 'p8'")
    fallback = _contents(snapshot_tables(lh, str(tmp_path / "raw"), DIMS, bucket_mb=0.003), "products")
    assert fallback == {k: v for k, v in products.items() if k != "p8"}
