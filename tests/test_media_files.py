"""Encoder tasks read media bytes from a Delta table's own Parquet files (`mmrank.media_files`), on a real
Delta table whose files span many row groups and Spark splits."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from urllib.parse import unquote

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from pyspark.sql import functions as F

from mmrank import storage
from mmrank.media_files import REF_COLUMNS, read_items, split_row_groups, with_refs

N = 240


def read_all(refs: pd.DataFrame, batch_rows: int = 7) -> tuple[dict[str, bytes], list[int]]:
    """{id: bytes} of every row `read_items` yields (each id once), and the size of each yield."""
    got, sizes = {}, []
    for rows, items in read_items(refs, "key", "blob", batch_rows):
        assert len(rows) == len(items) and not set(rows["id"]) & set(got)
        got.update(zip(rows["id"], items))
        sizes.append(len(items))
    return got, sizes


@contextmanager
def small_splits(spark, row_group_bytes: int, split_bytes: int):
    """Parquet row groups of ~`row_group_bytes` on write and Spark splits of `split_bytes` on read."""
    hconf = spark.sparkContext._jsc.hadoopConfiguration()
    sizes = {"parquet.block.size": str(row_group_bytes), "parquet.page.size.row.check.min": "4",
             "parquet.page.size.row.check.max": "4"}  # sizes checked every 4 rows (by default from row 100 on)
    old = {k: hconf.get(k) for k in sizes}
    old_split = spark.conf.get("spark.sql.files.maxPartitionBytes")
    for k, v in sizes.items():
        hconf.set(k, v)
    spark.conf.set("spark.sql.files.maxPartitionBytes", str(split_bytes))
    try:
        yield
    finally:
        for k, v in old.items():
            hconf.unset(k) if v is None else hconf.set(k, v)
        spark.conf.set("spark.sql.files.maxPartitionBytes", old_split)


@pytest.fixture(scope="module")
def media_table(spark, tmp_path_factory):
    """(references of every key, {key: bytes}): N rows of 8 KB incompressible bytes in 2 files of ~64 KB row groups,
    read in splits of 256 KB."""
    rng = np.random.default_rng(0)
    blobs = {f"k{i:03d}": rng.bytes(8192) for i in range(N)}
    path = str(tmp_path_factory.mktemp("media") / "my media %20" / "t")  # Spark URL-encodes _metadata.file_path
    df = spark.createDataFrame(pd.DataFrame({"key": list(blobs), "blob": list(blobs.values())}),
                               "key string, blob binary").repartition(2)
    with small_splits(spark, 64 * 1024, 256 * 1024):
        df.write.format("delta").save(path)
        table = spark.read.format("delta").load(path)
        refs = with_refs(table.select(F.col("key").alias("id")), table, "key").toPandas()
    return refs, blobs


def test_every_key_is_read_from_the_split_spark_gave_it(media_table, caplog):
    """Each row's (file, split) reference leads to its own bytes, found in that split's row groups (no
    whole-file fallback), and the row groups of a file are split between its splits exactly once each."""
    refs, blobs = media_table
    assert len(refs) == N and refs["media_file"].nunique() == 2
    splits = refs.drop_duplicates(list(REF_COLUMNS))
    assert len(splits) >= 6  # several splits per file
    for path, per_file in splits.groupby("media_file"):
        fs, p = storage.filesystem(unquote(path))
        with fs.open(p, "rb") as fh:
            meta = pq.ParquetFile(fh).metadata
        groups = [g for _, s in per_file.iterrows()
                  for g in split_row_groups(meta, s["media_start"], s["media_length"])]
        assert meta.num_row_groups >= 6 and sorted(groups) == list(range(meta.num_row_groups))
    with caplog.at_level(logging.WARNING, logger="mmrank.media"):
        shuffled = refs.sample(frac=1.0, random_state=0)  # rows of several splits, interleaved
        got, sizes = read_all(shuffled)
    assert got == {k: blobs[k] for k in shuffled["id"]}
    assert max(sizes) <= 7 and len(sizes) >= N // 7  # streamed: never more than batch_rows items at a time
    assert not [r for r in caplog.records if r.name == "mmrank.media"]


def test_a_key_outside_its_split_is_found_in_the_rest_of_the_file(media_table, caplog):
    """A reference whose split does not hold the key's row group (a writer that placed row groups otherwise)
    still gets the right bytes, with a warning; a key that is not in the file at all is an error."""
    refs, blobs = media_table
    row = refs.iloc[[0]].copy()
    far = refs[(refs["media_file"] == row["media_file"].iloc[0]) & (refs["media_start"] != row["media_start"].iloc[0])]
    row[["media_start", "media_length"]] = far[["media_start", "media_length"]].iloc[0].to_numpy()
    with caplog.at_level(logging.WARNING, logger="mmrank.media"):
        assert read_all(row)[0] == {row["id"].iloc[0]: blobs[row["id"].iloc[0]]}
    assert any("reading the whole file" in r.getMessage() for r in caplog.records)
    row["id"] = "not-a-key"
    with pytest.raises(FileNotFoundError, match="no row for 1 key"):
        read_all(row)
