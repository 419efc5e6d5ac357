"""Feature snapshots (issue #14): feature tables stored in id buckets are read in place (the current files only);
tables that are not get a snapshot written by the raw-file writer (pyarrow in tasks), which writes what the Spark
writer writes, in the buckets Spark's `bucket_of` names, and falls back to Spark when the files cannot be read
raw; a table written before it was bucketed takes the layout on its next write."""
from __future__ import annotations

import datetime as dt

import numpy as np
from pyspark.sql import Row
from pyspark.sql import functions as F

from mmrank.buckets import FEATURE_BUCKETS
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


def _unbucketed(lh: Lakehouse, name: str) -> None:
    """Rewrite a feature table in the layout it had before it was stored in id buckets (no `bucket` column)."""
    lh.read(name).write.format("delta").mode("overwrite").option("overwriteSchema", "true").save(lh.location(name))


def _stored(lh: Lakehouse, name: str):
    return lh.spark.read.format("delta").load(lh.location(name))


def test_raw_snapshot_equals_spark_snapshot_and_falls_back(spark, tmp_path):
    lh = Lakehouse(spark, make_config(tmp_path / "a lakehouse"))  # a space: file URIs come percent-encoded
    _tables(lh)
    for name in ("product_features", "query_features"):  # tables not stored in id buckets: a snapshot is written
        _unbucketed(lh, name)
    assert raw_files(lh, "product_features") is not None
    raw = snapshot_tables(lh, str(tmp_path / "raw"), DIMS, bucket_mb=0.003)
    assert raw.files is None and (tmp_path / "raw" / "products").is_dir()
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


def test_feature_tables_are_stored_in_id_buckets_and_read_in_place(spark, tmp_path):
    lh = Lakehouse(spark, make_config(tmp_path / "lh"))
    _tables(lh)
    stored = _stored(lh, "product_features").select("product_id", "bucket").toPandas()
    np.testing.assert_array_equal(stored["bucket"], bucket_ids(stored["product_id"], FEATURE_BUCKETS))
    assert "bucket" not in lh.read("product_features").columns  # a layout detail, not part of the contract
    ref = write_snapshot(str(tmp_path / "spark"),
                         usable_rows(lh.read("query_features"), "query_id", QUERY_MODALITIES, DIMS),
                         usable_rows(lh.read("product_features"), "product_id", PRODUCT_MODALITIES, DIMS),
                         bucket_mb=0.003)
    snap = snapshot_tables(lh, str(tmp_path / "snap"), DIMS, bucket_mb=1.0, min_product_buckets=3)
    assert snap.files is not None and not (tmp_path / "snap").exists()  # nothing written
    assert (snap.product_buckets, snap.query_buckets) == (4, 1)  # powers of two: groups of the stored buckets
    products = _contents(snap, "products")
    assert products == _contents(ref, "products") and _contents(snap, "queries") == _contents(ref, "queries")
    small = snapshot_tables(lh, str(tmp_path / "snap"), DIMS, bucket_mb=0.003)
    assert small.query_buckets > 1 and _contents(small, "queries") == _contents(ref, "queries")

    # a MERGE rewrites some files: the replaced ones stay on disk until VACUUM but are never read
    new = lh.read("product_features").where("product_id = 'p1' AND modality = 'text'").withColumn(
        "embedding", F.array_repeat(F.lit(0.5), DIMS["text"])).withColumn("content_hash", F.lit("changed"))
    lh.merge("product_features", new)
    after = _contents(snapshot_tables(lh, str(tmp_path / "snap"), DIMS, bucket_mb=0.003), "products")
    assert after["p1"]["text"] == [0.5] * DIMS["text"]
    assert {k: v for k, v in after.items() if k != "p1"} == {k: v for k, v in products.items() if k != "p1"}


def test_a_table_written_before_buckets_is_rewritten_into_them_once(spark, tmp_path):
    lh = Lakehouse(spark, make_config(tmp_path / "lh"))
    _tables(lh)
    before = lh.checksum("product_features")
    _unbucketed(lh, "product_features")
    assert "bucket" not in _stored(lh, "product_features").columns and lh.checksum("product_features") == before
    old = lh.read("product_features")
    new = spark.createDataFrame(old.where("product_id = 'p2'").collect(), old.schema).withColumn(
        "content_hash", F.lit("changed"))
    lh.merge("product_features", new)  # the first write puts the table back into its buckets, rows unchanged
    stored = _stored(lh, "product_features").select("product_id", "content_hash", "bucket").toPandas()
    np.testing.assert_array_equal(stored["bucket"], bucket_ids(stored["product_id"], FEATURE_BUCKETS))
    assert set(stored.loc[stored["product_id"] == "p2", "content_hash"]) == {"changed"}
    assert len(stored) == len(lh.read("product_features").toPandas()) == 3 * 30 + 1
